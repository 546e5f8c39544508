"""Validation during training, and trained checkpoints as generation pipelines.

    validator = Validator.from_config(config, workdir, tokenizers)   # None when config.eval.sets is empty
    validator(model, step, writer)      # every config.eval_every steps, from the train loop

Each call runs the validation protocol (`evaluation.protocol`) with the current parameters: every
identity of every `config.eval.sets` folder x prompts x seeds, scored by the metrics `config.eval.metrics`
(`evaluation/metrics.py`; CLIP-T and Face-Sim by default), written to WORKDIR/eval/step_<step>/ (images,
metrics.json, scores.csv, report.html = the grid); the per-set means go to metrics.jsonl / TensorBoard as
eval/<set>/<metric> (and counts such as eval/<set>/no_face) and to WORKDIR/eval/history.jsonl, which
`python -m persongen_jax.evaluate --compare` plots.

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
from persongen_jax.evaluation import metrics as metrics_lib
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


def metric_options(ev) -> dict:
    """The scoring options (`metrics.build`) of a config's `eval` section."""
    return {k: ev.get(k) for k in ("clip", "face_detector", "arcface", "no_face", "det_thresh", "face_select")}


class Validator:
    """Validation during training: the protocol on the current parameters, logged and written per step."""

    def __init__(self, config, workdir, tokenizers, sets, prompts, metrics, references=None):
        self.config = config
        self.workdir = Path(workdir)
        self.tokenizers = tokenizers
        self.sets, self.prompts, self.metrics = sets, prompts, metrics
        self.references = references
        self.settings = protocol_settings(config)
        self.pipe = None

    @classmethod
    def from_config(cls, config, workdir, tokenizers) -> "Validator | None":
        """Loads sets, prompts and the scoring models now, so a wrong path fails before training starts."""
        ev = config.eval
        if not ev.sets:
            return None
        sets = protocol.load_sets(protocol.parse_sets(ev.sets))
        prompts = protocol.load_prompts(ev.prompts or None)
        if ev.num_prompts:
            prompts = prompts[:ev.num_prompts]
        try:
            metrics = metrics_lib.build(tuple(ev.get("metrics", metrics_lib.DEFAULT_METRICS)), metric_options(ev))
        except ValueError as e:
            raise ValueError(f"config.eval.sets is set but {e} (or choose other config.eval.metrics)") from None
        refs = protocol.load_references(sets, metrics)  # a reference without a face fails now
        n = sum(len(ids) for ids in sets.values()) * len(prompts) * len(ev.seeds)
        log.info("validation every %d steps: %s, %d prompts x %d seeds = %d images", config.eval_every,
                 {k: len(v) for k, v in sets.items()}, len(prompts), len(ev.seeds), n)
        return cls(config, workdir, tokenizers, sets, prompts, metrics, refs)

    def __call__(self, model, step: int, writer) -> dict:
        if self.pipe is None:
            self.pipe = PersonGenPipeline.from_model(model, self.tokenizers, scheduler_config(self.config),
                                                     trigger_word=self.config.data.trigger_word,
                                                     conditions=conditions_lib.from_config(self.config))
        else:
            for name in MODULES:
                nnx.update(getattr(self.pipe, name), nnx.state(getattr(model, name)))
        out = self.workdir / "eval" / f"step_{step:08d}"
        result = protocol.run_protocol(self.pipe, self.sets, self.prompts, self.metrics, out, self.settings,
                                       step=step, title=f"validation at step {step}",
                                       references=self.references)
        names = [m.name for m in self.metrics]
        keys = names + [m.missing_key for m in self.metrics if m.missing_key]
        scalars, lines = {}, []
        for name, m in result.metrics["sets"].items():
            for key in keys:
                if m[key] is not None:
                    scalars[f"eval/{name}/{key}"] = m[key]
            lines.append({"step": step, "set": name, **{k: m[k] for k in keys}, "n_images": m["n_images"],
                          "report": str(out / "report.html"), "metric_names": names})
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
    from persongen_jax.training import checkpoint as ckpt_lib
    from persongen_jax.training import optimizer as optim_lib
    from persongen_jax.training import state as state_lib
    from persongen_jax.training.model import build_model

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
        split, params, frozen, rest = state_lib.split_model(model, groups)
        tx = optim_lib.make_optimizer(params, groups, config.optim)
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))  # one device, whatever trained
        target = state_lib.abstract_checkpoint(params, tx, mesh, config.sharding)
        restored, _ = ckpt_lib.restore(mngr, step, target)
    finally:
        mngr.close()
    return split.merge(restored["params"], frozen, rest), tokenizers, step


def load_trained_pipeline(workdir, config=None, step: int | None = None, *, merge_lora: bool = True):
    """A PersonGenPipeline from a training run folder's checkpoint -> (pipeline, step, config)."""
    from persongen_jax.models import lora as lora_lib

    config = config or read_config(workdir)
    model, tokenizers, step = load_trained_model(workdir, config, step)
    if merge_lora and config.lora.rank > 0:
        lora_lib.merge_lora(model.unet)
    pipe = PersonGenPipeline.from_model(model, tokenizers, scheduler_config(config),
                                        trigger_word=config.data.trigger_word,
                                        sample_size=config.data.resolution // model.vae.downscale_factor,
                                        conditions=conditions_lib.from_config(config))
    return pipe, step, config
