"""Validation during training: sample images every `config.eval_every` steps, scored when scoring models are set.

    validator = Validator.from_config(config, workdir, tokenizers)   # built when config.eval_every > 0
    validator(model, step, writer)      # every config.eval_every steps, from the train loop

Each call runs the validation protocol (`evaluation.protocol`) with the current parameters: every identity
x prompt x seed (config.eval.prompts / num_prompts / seeds), written to WORKDIR/samples/<step>/ (images/,
report.html = the reference | generations grid, and with scores metrics.json + scores.csv) and to
TensorBoard as one image per set, `samples/<set>` (a row per identity and prompt: the first reference,
then one image per seed). The identities: those of the `config.eval.sets` folders, or without sets a fixed
sample of `config.eval.num_identities` training identities (`training.data.sample_identities`).

Scores are added for the metrics of `config.eval.metrics` (`evaluation/metrics.py`; CLIP-T and Face-Sim by
default) whose scoring models are configured (config.eval.clip, .face_detector, .arcface); a metric with
none of its models set is left out (images only), one with some but not all is an error. The per-set means
go to metrics.jsonl / TensorBoard as eval/<set>/<metric> (and counts such as eval/<set>/no_face) and to
WORKDIR/eval/history.jsonl, which `python -m persongen_jax.evaluate --compare` plots.

The pipeline is built once on the first call; later calls put the new weights into the same modules
(`nnx.update`), so the sampling loop compiles once per run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from persongen_jax.evaluation import metrics as metrics_lib
from persongen_jax.evaluation import protocol
from persongen_jax.pipeline import id_unused_warning
from persongen_jax.pipeline.pipeline import MODEL_MODULES
from persongen_jax.training import data as data_lib
from persongen_jax.training.model import inference_pipeline

log = logging.getLogger("persongen_jax.train")


def protocol_settings(config) -> protocol.ProtocolSettings:
    """The validation protocol settings of a training config (`config.eval`, size 0 = data.resolution)."""
    ev = config.eval
    size = ev.resolution or config.data.resolution
    seeds = tuple(int(s) for s in ev.seeds)
    return protocol.ProtocolSettings.from_attributes(
        ev, seeds=seeds, height=size, width=size, trigger_word=config.data.trigger_word
    )


def metric_options(ev) -> dict:
    """The scoring options (`metrics.build`) of a config's `eval` section."""
    return {
        k: ev.get(k)
        for k in (
            "clip",
            "dino",
            "inception",
            "fid_reference",
            "lpips",
            "face_detector",
            "arcface",
            "no_face",
            "det_thresh",
            "face_select",
        )
    }


def scoring_metrics(ev) -> list:
    """The metrics of `config.eval.metrics` whose scoring models are configured (built); a metric with none of
    its models set is left out (logged), one with only some of them is a ValueError naming the missing keys."""
    names = tuple(ev.get("metrics", metrics_lib.DEFAULT_METRICS))
    options = metric_options(ev)
    chosen: list[str] = []
    left_out: list[str] = []
    for name in names:
        given = [bool(options.get(key)) for key in metrics_lib.get(name).requires]
        # all of its models given, or only some (then `build` names the missing ones): chosen
        (chosen if not given or any(given) else left_out).append(name)
    if left_out:
        log.info(
            "validation images without %s scores (set %s to score them)",
            ", ".join(left_out),
            ", ".join(f"config.eval.{k}" for n in left_out for k in metrics_lib.get(n).requires),
        )
    try:
        return metrics_lib.build(chosen, options)
    except ValueError as e:
        raise ValueError(
            f"config.eval: {e} (or leave all of a metric's models empty, or choose other config.eval.metrics)"
        ) from None


def sample_grid(rows: list[dict], out_dir: Path, set_name: str, references: dict) -> np.ndarray:
    """The TensorBoard image of one set: a row per (identity, prompt), the identity's first reference then one
    generation per seed, uint8 [H, W, 3]."""
    rows = [r for r in rows if r["set"] == set_name]
    lines: dict = {}
    for r in rows:
        lines.setdefault((r["reference"], r["prompt_index"]), []).append(np.asarray(Image.open(out_dir / r["image"])))
    tile = next(iter(lines.values()))[0].shape[:2]
    out = []
    for (ident, _), images in lines.items():
        ref = references[(set_name, ident)][0][0].convert("RGB").resize(tile[::-1])
        out.append(np.concatenate([np.asarray(ref), *images], axis=1))
    return np.concatenate(out, axis=0)


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
    def from_config(cls, config, workdir, tokenizers) -> "Validator":
        """Loads sets, prompts and the scoring models now, so a wrong path fails before training starts (the
        training identities, used without sets, are read at the first call: the demo dataset may not exist
        yet)."""
        ev = config.eval
        prompts = protocol.load_prompts(ev.prompts or None)
        if ev.num_prompts:
            prompts = prompts[: ev.num_prompts]
        metrics = scoring_metrics(ev)
        sets = refs = None
        if ev.sets:
            sets = protocol.load_sets(protocol.parse_sets(ev.sets))
            refs = protocol.load_references(sets, metrics)  # a reference without a face fails now
            what: dict[str, int] | str = {k: len(v) for k, v in sets.items()}
        else:
            what = f"{ev.num_identities} training identities (no config.eval.sets)"
        warning = id_unused_warning(ev.start_merge_step, ev.num_steps)
        if warning:
            log.warning("config.eval: %s", warning.replace("start merge step", "eval.start_merge_step", 1))
        log.info(
            "validation every %d steps: %s x %d prompts x %d seeds -> WORKDIR/samples/<step>/%s",
            config.eval_every,
            what,
            len(prompts),
            len(ev.seeds),
            f", scored by {[m.name for m in metrics]}" if metrics else " (no scoring models: images only)",
        )
        return cls(config, workdir, tokenizers, sets, prompts, metrics, refs)

    def _training_identities(self) -> None:
        faces = data_lib.sample_identities(self.config, self.workdir, self.config.eval.num_identities)
        self.sets = {
            "train": {ident: [f"{ident}/reference_{k}" for k in range(len(imgs))] for ident, imgs in faces.items()}
        }
        self.references = {
            ("train", ident): (imgs, protocol.prepare_references(self.metrics, imgs, names))
            for (ident, imgs), names in zip(faces.items(), self.sets["train"].values())
        }

    def __call__(self, model, step: int, writer) -> dict:
        """Runs the protocol on `model` (the current parameters), writes WORKDIR/samples/<step>/, the sample
        grids and the per-set means through `writer` and eval/history.jsonl; returns the metrics."""
        if self.pipe is None:
            # PhotoMaker V2 without its own ArcFace (config.init.arcface empty): the references' embeddings from
            # the scoring face models (config.eval.face_detector + arcface), as `generate` computes them
            ev = self.config.eval
            own = getattr(model, "arcface", None) is not None
            self.pipe = inference_pipeline(
                model,
                self.tokenizers,
                self.config,
                merge_lora=False,
                face_models=None if own else ev.face_detector,
                arcface=None if own else ev.arcface,
            )
        else:
            for name in MODEL_MODULES:
                nnx.update(getattr(self.pipe, name), nnx.state(getattr(model, name)))
        if self.sets is None:
            self._training_identities()
        out = self.workdir / "samples" / str(step)
        result = protocol.run_protocol(
            self.pipe,
            self.sets,
            self.prompts,
            self.metrics,
            out,
            self.settings,
            step=step,
            title=f"validation at step {step}",
            references=self.references,
        )
        if jax.process_index() == 0:
            writer.write_images(
                step, {f"samples/{name}": sample_grid(result.rows, out, name, self.references) for name in self.sets}
            )
        names = [m.name for m in self.metrics]
        keys = names + [m.missing_key for m in self.metrics if m.missing_key]
        scalars, lines = {}, []
        for name, m in result.metrics["sets"].items():
            for key in keys:
                if m[key] is not None:
                    scalars[f"eval/{name}/{key}"] = m[key]
            lines.append(
                {
                    "step": step,
                    "set": name,
                    **{k: m[k] for k in keys},
                    "n_images": m["n_images"],
                    "report": str(out / "report.html"),
                    "metric_names": names,
                }
            )
        scalars["eval/seconds"] = result.seconds["total"]
        writer.write(step, scalars)
        if jax.process_index() == 0 and names:  # the history holds scores (evaluate --compare plots them)
            (self.workdir / "eval").mkdir(exist_ok=True)
            with open(self.workdir / "eval" / "history.jsonl", "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        log.info(
            "validation at step %d: %s (%s)",
            step,
            {k: round(v, 4) for k, v in scalars.items() if k != "eval/seconds"} or "images",
            out / "report.html",
        )
        return result.metrics
