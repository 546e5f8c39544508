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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
from flax import nnx

from persongen_jax import conditions as conditions_lib
from persongen_jax.evaluation import metrics as metrics_lib
from persongen_jax.evaluation import protocol
from persongen_jax.pipeline.pipeline import PersonGenPipeline
from persongen_jax.training.model import scheduler_config

log = logging.getLogger("persongen_jax.train")
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2", "id_encoder")


def protocol_settings(config) -> protocol.ProtocolSettings:
    """The validation protocol settings of a training config (`config.eval`, size 0 = data.resolution)."""
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
        """Runs the protocol on `model` (the current parameters), writes WORKDIR/eval/step_<step>/, logs the
        per-set means through `writer` and eval/history.jsonl; returns the metrics."""
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
