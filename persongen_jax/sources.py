"""Model sources as data: where a pipeline's model comes from, and the one `load_pipeline` of every entry
point (generate, evaluate mode B, the web app).

    source = ModelSource(model="weights/sdxl", photomaker="weights/photomaker")      # converted folders
    source = ModelSource(checkpoint="runs/final_method", step=4000)                   # a training run
    source = ModelSource(tiny=load_config(DEMO_CONFIG))                               # tiny random models
    pipe, step, config = load_pipeline(source, SamplingSettings(dtype="bfloat16"), workdir=tmp)

A training run is rebuilt from its folder's config.json (or `config`) with the trained parameters of a
checkpoint (`load_trained_model`, also what `weights_conversion export-lora` reads); the run folder's
layout, lock and config checks live in `training/run_folder.py`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from persongen_jax.pipeline.pipeline import PersonGenPipeline, require_face_models
from persongen_jax.pipeline.prompt import DEFAULT_TRIGGER_WORD
from persongen_jax.pipeline.settings import SamplingSettings
from persongen_jax.training import checkpoint as ckpt_lib
from persongen_jax.training import optimizer as optim_lib
from persongen_jax.training import state as state_lib
from persongen_jax.training.model import build_model, inference_pipeline
from persongen_jax.training.run_folder import read_config

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One of: `model` (a converted SDXL folder, with `photomaker` / `lora` / `adapters` folders),
    `checkpoint` (a training run folder; `step`: its checkpoint, default the latest; `config`: instead of
    RUN/config.json), or `tiny` (a training config whose random tiny models are built in memory)."""

    model: PathLike | None = None
    checkpoint: PathLike | None = None
    step: int | None = None
    photomaker: PathLike | None = None
    lora: PathLike | None = None
    adapters: PathLike | None = None
    trigger_word: str = DEFAULT_TRIGGER_WORD
    face_models: PathLike | None = None  # PhotoMaker V2: SCRFD folder + converted ArcFace of the references
    arcface: PathLike | None = None
    config: Any = None
    tiny: Any = None

    @property
    def kind(self) -> str:
        return "tiny" if self.tiny is not None else "checkpoint" if self.checkpoint else "model"

    def check(self, settings: SamplingSettings | None = None) -> None:
        """ValueError for options that do not go together (before anything loads): a run or tiny models bring
        their own model and settings, `step` needs a run."""
        settings = settings or SamplingSettings()
        own = {"tiny": "--tiny", "checkpoint": "--checkpoint"}.get(self.kind)
        if own and (self.photomaker or self.lora or self.adapters):
            raise ValueError(f"{own} brings its own model: drop --photomaker / --lora / --adapters")
        if own and (settings.dtype or settings.attention != SamplingSettings.attention):
            raise ValueError("--dtype / --attention go with --model (a run's config sets them)")
        if self.step is not None and not self.checkpoint:
            raise ValueError("--step goes with --checkpoint")

    def settings_json(self, settings: SamplingSettings | None = None) -> dict:
        """The settings.json keys naming the model (generate and the web app write the same ones)."""
        settings = settings or SamplingSettings()
        path = lambda p: str(p) if p else None  # noqa: E731
        return {
            "model": path(self.model),
            "checkpoint": path(self.checkpoint),
            "step": self.step,
            "photomaker": path(self.photomaker),
            "lora": path(self.lora),
            "adapters": path(self.adapters),
            "face_models": path(self.face_models),
            "arcface": path(self.arcface),
            "dtype": settings.dtype,
            "attention": settings.attention,
        }


def load_trained_model(workdir: PathLike, config=None, step: int | None = None):
    """Rebuilds the training model of a run folder with the trained parameters of checkpoint `step`
    (default: the latest) -> (PersonGenModel, tokenizers, step)."""
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


def load_pipeline(
    source: ModelSource,
    settings: SamplingSettings | None = None,
    *,
    workdir: PathLike | None = None,
    merge_lora: bool = True,
):
    """The pipeline of `source` -> (pipeline, step, config): a run's checkpoint step and training config,
    (None, the config) for tiny models (built with tokenizer files in `workdir`), (None, None) for converted
    folders, loaded with `settings.dtype` / `settings.attention`."""
    settings = settings or SamplingSettings()
    source.check(settings)
    if source.kind == "tiny":
        if workdir is None:
            raise ValueError("tiny models need a workdir for their tokenizer files")
        model, tokenizers, _ = build_model(source.tiny, workdir)  # random weights
        return inference_pipeline(model, tokenizers, source.tiny, merge_lora=merge_lora), None, source.tiny
    if source.kind == "checkpoint":
        config = source.config or read_config(source.checkpoint)
        model, tokenizers, step = load_trained_model(source.checkpoint, config, source.step)
        # PhotoMaker V2 runs: --face-models / --arcface when given, else the run's own frozen ArcFace
        return (
            inference_pipeline(
                model, tokenizers, config, merge_lora=merge_lora, face_models=source.face_models, arcface=source.arcface
            ),
            step,
            config,
        )
    # PhotoMaker V2 needs the face models (the references' ArcFace embeddings): say so before loading.
    require_face_models(source.photomaker or source.model, source.face_models, source.arcface)
    pipe = PersonGenPipeline.from_pretrained(
        source.model,
        photomaker=source.photomaker,
        lora=source.lora,
        adapters=source.adapters,
        dtype=getattr(jnp, settings.dtype) if settings.dtype else None,
        attention_impl=settings.attention,
        merge_lora=merge_lora,
        trigger_word=source.trigger_word,
        face_models=source.face_models,
        arcface=source.arcface,
    )
    return pipe, None, None
