"""Validation during training, and trained checkpoints as generation pipelines.

    validator = Validator.from_config(config, workdir, tokenizers)   # None when config.eval.sets is empty
    validator(model, step, writer)      # every config.eval_every steps, from the train loop

Each call runs the validation protocol (`evaluation.protocol`) with the current parameters: every
identity of every `config.eval.sets` folder x prompts x seeds, CLIP-T and Face-Sim, written to
WORKDIR/eval/step_<step>/ (images, metrics.json, scores.csv, report.html = the grid); the per-set means
go to metrics.jsonl / TensorBoard as eval/<set>/clip_t, eval/<set>/face_sim, eval/<set>/no_face and to
WORKDIR/eval/history.jsonl, which `python -m persongen_jax.evaluate --compare` plots.

The pipeline is built once on the first call; later calls put the new weights into the same modules
(`nnx.update`), so the sampling loop compiles once per run.

    pipe, step = load_trained_pipeline("runs/final_method")          # for `evaluate --checkpoint`
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from persongen_jax import conditions as conditions_lib
from persongen_jax.evaluation import protocol
from persongen_jax.pipeline.pipeline import PersonGenPipeline
from persongen_jax.training.model import scheduler_config

log = logging.getLogger("persongen_jax.train")
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2", "id_encoder")
CONFIG_FILE = "config.json"


def protocol_settings(config) -> protocol.ProtocolSettings:
    ev = config.eval
    size = ev.resolution or config.data.resolution
    return protocol.ProtocolSettings(seeds=tuple(int(s) for s in ev.seeds), num_steps=ev.num_steps,
                                     guidance_scale=ev.guidance_scale, start_merge_step=ev.start_merge_step,
                                     height=size, width=size, split=ev.split,
                                     trigger_word=config.data.trigger_word)


class Validator:
    def __init__(self, config, workdir, tokenizers, sets, prompts, scorers, references=None):
        self.config = config
        self.workdir = Path(workdir)
        self.tokenizers = tokenizers
        self.sets, self.prompts, self.scorers = sets, prompts, scorers
        self.references = references
        self.settings = protocol_settings(config)
        self.pipe = None

    @classmethod
    def from_config(cls, config, workdir, tokenizers) -> "Validator | None":
        """Loads sets, prompts and the scoring models now, so a wrong path fails before training starts."""
        ev = config.eval
        if not ev.sets:
            return None
        missing = [f"config.eval.{k}" for k in ("clip", "face_detector", "arcface") if not ev.get(k)]
        if missing:
            raise ValueError(f"config.eval.sets is set but {missing} is empty: validation needs a converted CLIP "
                             "(weights_conversion clip), an insightface detector folder and a converted ArcFace")
        sets = protocol.load_sets(protocol.parse_sets(ev.sets))
        prompts = protocol.load_prompts(ev.prompts or None)
        if ev.num_prompts:
            prompts = prompts[:ev.num_prompts]
        scorers = protocol.Scorers.from_pretrained(clip=ev.clip, detector=ev.face_detector, arcface=ev.arcface,
                                                   no_face=ev.no_face, det_thresh=ev.det_thresh,
                                                   face_select=ev.face_select)
        refs = protocol.load_references(sets, scorers)  # a reference without a face fails now
        n = sum(len(ids) for ids in sets.values()) * len(prompts) * len(ev.seeds)
        log.info("validation every %d steps: %s, %d prompts x %d seeds = %d images", config.eval_every,
                 {k: len(v) for k, v in sets.items()}, len(prompts), len(ev.seeds), n)
        return cls(config, workdir, tokenizers, sets, prompts, scorers, refs)

    def __call__(self, model, step: int, writer) -> dict:
        if self.pipe is None:
            self.pipe = PersonGenPipeline.from_model(model, self.tokenizers, scheduler_config(self.config),
                                                     trigger_word=self.config.data.trigger_word,
                                                     conditions=conditions_lib.from_config(self.config))
        else:
            for name in MODULES:
                nnx.update(getattr(self.pipe, name), nnx.state(getattr(model, name)))
        out = self.workdir / "eval" / f"step_{step:08d}"
        result = protocol.run_protocol(self.pipe, self.sets, self.prompts, self.scorers, out, self.settings,
                                       step=step, title=f"validation at step {step}",
                                       references=self.references)
        scalars, lines = {}, []
        for name, m in result.metrics["sets"].items():
            for key in ("clip_t", "face_sim", "no_face"):
                if m[key] is not None:
                    scalars[f"eval/{name}/{key}"] = m[key]
            lines.append({"step": step, "set": name, "clip_t": m["clip_t"], "face_sim": m["face_sim"],
                          "no_face": m["no_face"], "n_images": m["n_images"], "report": str(out / "report.html")})
        scalars["eval/seconds"] = result.seconds["total"]
        writer.write(step, scalars)
        if jax.process_index() == 0:
            with open(self.workdir / "eval" / "history.jsonl", "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        log.info("validation at step %d: %s (%s)", step,
                 {k: round(v, 4) for k, v in scalars.items() if k != "eval/seconds"}, out / "report.html")
        return result.metrics


def save_config(config, workdir) -> None:
    """WORKDIR/config.json: what `load_trained_pipeline` rebuilds the model from."""
    (Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def read_config(workdir):
    import ml_collections

    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no training config (a run folder of `python -m persongen_jax.train` has one; "
                         "or pass --config configs/X.py)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_trained_model(workdir, config=None, step: int | None = None):
    """Rebuilds the training model of a run folder with the trained parameters of checkpoint `step`
    (default: the latest) -> (PersonGenModel, tokenizers, step)."""
    import orbax.checkpoint as ocp

    from persongen_jax.training import checkpoint as ckpt_lib
    from persongen_jax.training import optimizer as optim_lib
    from persongen_jax.training.model import build_model
    from persongen_jax.training.train_loop import _merge_model, _split_model

    workdir = Path(workdir)
    config = config or read_config(workdir)
    if not (workdir / "checkpoints").is_dir():  # checked first: the manager would create the folder
        raise ValueError(f"{workdir / 'checkpoints'}: no such folder (not a training run folder)")
    mngr = ckpt_lib.make_manager(workdir, config.keep_checkpoints)
    try:
        steps = list(mngr.all_steps())
        if not steps:
            raise ValueError(f"{workdir / 'checkpoints'}: no checkpoints")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise ValueError(f"{workdir / 'checkpoints'}: no checkpoint at step {step} (have {sorted(steps)})")
        model, tokenizers, _ = build_model(config, workdir)
        groups = {g: dict(spec) for g, spec in config.trainable.items() if spec.lr > 0}
        graphdef, params, template, frozen, rest = _split_model(model, groups)
        tx = optim_lib.make_optimizer(params, groups, config.optim)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": np.int64(0)}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=dev), state)
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        mngr.close()
    return _merge_model(graphdef, template, restored["params"], frozen, rest), tokenizers, step


def inference_pipeline(model, tokenizers, config, *, merge_lora: bool = True) -> PersonGenPipeline:
    """A training model of `config` (`build_model`, or restored) as a generation pipeline: LoRA folded into
    the base kernels, the config's scheduler, trigger word, resolution and conditions."""
    from persongen_jax.models import lora as lora_lib

    if merge_lora and config.lora.rank > 0:
        lora_lib.merge_lora(model.unet)
    return PersonGenPipeline.from_model(model, tokenizers, scheduler_config(config),
                                        trigger_word=config.data.trigger_word,
                                        sample_size=config.data.resolution // model.vae.downscale_factor,
                                        conditions=conditions_lib.from_config(config))


def load_trained_pipeline(workdir, config=None, step: int | None = None, *, merge_lora: bool = True):
    """A PersonGenPipeline from a training run folder's checkpoint -> (pipeline, step, config)."""
    config = config or read_config(workdir)
    model, tokenizers, step = load_trained_model(workdir, config, step)
    return inference_pipeline(model, tokenizers, config, merge_lora=merge_lora), step, config
