"""The generation pipeline: a converted SDXL folder (+ PhotoMaker, LoRA, adapters) -> images.

    pipe = PersonGenPipeline.from_pretrained("weights/sdxl", photomaker="weights/photomaker")
    images = pipe("a photo of a man img wearing a red hat", ref_images=[face], seeds=[0, 1, 2])

Model folders (all written by `python -m weights_conversion`):

    MODEL/unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2 [, scheduler]   (`sdxl`)
    PHOTOMAKER/id_encoder [, lora]                                                      (`photomaker`)
                                                   (PhotoMaker v1 or V2; V2 also needs `face_models` + `arcface`)
    LORA/ (a LoRA folder)                          ADAPTERS/ (an adapter folder: one adapter per condition)

PhotoMaker is looked for in MODEL itself when not given (MODEL/id_encoder, MODEL/lora).
Host work (tokenizing, image preprocessing, text/ID encoding) happens once per call;
the denoising loop and the VAE decode are one compiled function per (steps, size, seeds).
"""

from __future__ import annotations

import math
import os
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from persongen_jax import conditions as conditions_lib
from persongen_jax.conditions import Condition
from persongen_jax.models import lora as lora_lib
from persongen_jax.models import modeling
from persongen_jax.pipeline import SDXL_SCHEDULER_CONFIG, resolve_start_merge_step
from persongen_jax.pipeline import prompt as prompt_lib
from persongen_jax.pipeline.control import prepare_control_image
from persongen_jax.pipeline.image_processing import clip_preprocess
from persongen_jax.pipeline.sampling import Conditioning, ControlConditioning, make_sampler, sdxl_time_ids
from persongen_jax.pipeline.schedulers import read_scheduler_config, scheduler_from_config
from persongen_jax.pipeline.settings import PipelineError, SamplingSettings  # noqa: F401 (re-exported)

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# The modules a pipeline built `from_model` shares with the training model (validation updates them in place).
MODEL_MODULES = (*SDXL_COMPONENTS, "id_encoder")


V2_NEEDS_FACE_MODELS = (
    "PhotoMaker V2 needs each reference face's ArcFace embedding: pass --face-models DIR (an "
    "insightface folder with an SCRFD detector, buffalo_l as the official pipeline) and --arcface "
    "DIR (weights_conversion arcface w600k_r50.onnx DIR)"
)


def photomaker_version(folder: str | os.PathLike) -> str | None:
    """ "v1" / "v2" of the converted PhotoMaker in `folder` (its id_encoder/config.json), None without one."""
    config = Path(folder) / "id_encoder" / modeling.CONFIG_FILE
    if not config.is_file():
        return None
    try:
        return getattr(
            modeling.get_model_class(modeling.read_config(config.parent)[modeling.CLASS_KEY]), "version", None
        )
    except (ValueError, KeyError) as e:
        raise PipelineError(f"{config}: {e}") from None


def require_face_models(photomaker: str | os.PathLike, face_models, arcface) -> None:
    """Before loading anything: PipelineError when the PhotoMaker in `photomaker` is V2 and the face models its
    ArcFace embeddings need are not both given."""
    if photomaker_version(photomaker) == "v2" and not (face_models and arcface):
        raise PipelineError(f"{Path(photomaker) / 'id_encoder'}: {V2_NEEDS_FACE_MODELS}")


def load_face_embedder(face_models, arcface, *, id_embeddings_dim: int, where):
    """The ReferenceFaceEmbedder PhotoMaker V2 needs (`evaluation.id_embeds`) from the SCRFD folder and the
    converted ArcFace; PipelineError when they are missing, unusable or of another width than the encoder's."""
    if not (face_models and arcface):
        raise PipelineError(f"{where}: {V2_NEEDS_FACE_MODELS}")
    from persongen_jax.evaluation.id_embeds import ReferenceFaceEmbedder

    try:
        embedder = ReferenceFaceEmbedder.from_pretrained(face_models, arcface)
    except (ValueError, FileNotFoundError) as e:
        raise PipelineError(str(e)) from None
    if embedder.num_features != id_embeddings_dim:
        raise PipelineError(
            f"{arcface}: ArcFace embeddings of width {embedder.num_features}, but the PhotoMaker V2 "
            f"encoder {where} takes {id_embeddings_dim}"
        )
    return embedder


def embed_references(embedder, images: Sequence, names: Sequence[str] | None) -> np.ndarray:
    """embedder(images, names) -> [N, F]; a reference without a face is a PipelineError naming it."""
    from persongen_jax.evaluation.face_sim import NoFaceError

    try:
        return embedder(list(images), names)
    except NoFaceError as e:
        raise PipelineError(str(e)) from None


def reference_id_embeds(
    photomaker: str | os.PathLike, images: Sequence, names: Sequence[str] | None, face_models, arcface
) -> np.ndarray | None:
    """Before loading SDXL (a CLI's early check): the references' ArcFace embeddings [N, F] when the PhotoMaker
    in `photomaker` is V2, None otherwise. PipelineError when the face models are missing or a reference has no
    face (named)."""
    if photomaker_version(photomaker) != "v2":
        return None
    where = Path(photomaker) / "id_encoder"
    from persongen_jax.models.id_encoder_v2 import parse_config

    width = parse_config(modeling.read_config(where)).id_embeddings_dim
    embedder = load_face_embedder(face_models, arcface, id_embeddings_dim=width, where=where)
    return embed_references(embedder, images, names)


def _require(folder: Path, what: str) -> Path:
    if not (folder / modeling.CONFIG_FILE).is_file():
        raise PipelineError(f"{folder}: missing {what} (expected a folder written by `python -m weights_conversion`)")
    return folder


def load_controlnet(path: str | os.PathLike, unet, vae, **kw):
    """A converted ControlNet folder, checked against the UNet it steers and the VAE's factor; PipelineError
    (one line, naming the folder and listing the shapes) otherwise."""
    from persongen_jax.models.controlnet import ControlNetModel, check_matches_unet

    path = Path(path)
    cn = modeling.from_pretrained(_require(path, "ControlNet (config.json)"), **kw)
    if not isinstance(cn, ControlNetModel):
        raise PipelineError(
            f"{path}: holds a {type(cn).__name__}, not a ControlNet (convert one with "
            "`python -m weights_conversion controlnet SRC DST`)"
        )
    try:
        check_matches_unet(cn.config, unet.config, name=f"{path}: this ControlNet")
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if cn.downscale_factor != vae.downscale_factor:
        raise PipelineError(
            f"{path}: this ControlNet takes control images at {cn.downscale_factor}x the latent size, "
            f"the VAE decodes at {vae.downscale_factor}x"
        )
    return cn


class _StepCallback:
    """The part of a tqdm bar the sampling callback uses (update / close), calling fn(steps done)."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn, self.n = fn, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        self.fn(self.n)

    def close(self) -> None:
        pass


class PersonGenPipeline:
    """SDXL + PhotoMaker ID encoder (+ LoRA, adapters) as one callable: prompt, reference faces and condition
    texts in, uint8 images out (`__call__`). Build it from converted folders (`from_pretrained`) or from a
    training model in memory (`from_model`)."""

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizers,
        scheduler_config: dict,
        id_encoder=None,
        force_zeros_for_empty_prompt: bool = True,
        trigger_word: str = "img",
        sample_size: int = 128,
        conditions: Mapping[str, Condition] | None = None,
        face_embedder=None,
        controlnets: Sequence = (),
    ):
        self.unet, self.vae = unet, vae
        self.controlnets = list(controlnets)  # ControlNetModel modules (`generate --controlnet`), in order
        self.t2i_adapter: Any = None  # a T2IAdapter module (`add_t2i_adapter`, `generate --t2i-adapter`)
        self._t2i = nnx.jit(lambda m, x: m(x), graph_updates=False)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        self.id_encoder = id_encoder
        # PhotoMaker V2: the references' ArcFace embeddings (`evaluation.id_embeds.ReferenceFaceEmbedder`, or
        # a function that loads it on first use).
        self.face_embedder = face_embedder
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.trigger_word = trigger_word
        self.sample_size = sample_size  # the UNet config's latent size: default image = sample_size * vae factor
        self.adapters = lora_lib.adapter_config(unet)
        # The model's adapter conditions (kind, gating): from the training config when known, else inferred
        # from the adapter folder (the image projection's condition is the gated image condition).
        names = self.adapters["names"] if self.adapters else []
        image_proj = (self.adapters or {}).get("image_projection") or {}
        known = dict(conditions or {})
        self.conditions = {n: known.get(n) or conditions_lib.infer([n], image_proj.get("condition"))[n] for n in names}
        self._samplers: dict = {}
        self._bar: Any = None  # a tqdm bar or a _StepCallback while sampling
        # Read-only encoders: graph_updates=False, or nnx.jit returns a copy of every parameter per call.
        jit = lambda f: nnx.jit(f, graph_updates=False)  # noqa: E731
        self._encode_text = jit(prompt_lib.encode_prompt)
        self._encode_id: Any = (
            jit(lambda enc, pixels, embeds, mask, *ids: enc(pixels, embeds, mask, *ids)) if id_encoder else None
        )
        self._id_embeds: Any = jit(lambda enc, pixels: enc.id_embeds(pixels)) if id_encoder else None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        photomaker: str | os.PathLike | None = None,
        lora: str | os.PathLike | None = None,
        adapters: str | os.PathLike | None = None,
        dtype=None,
        attention_impl: str = "xla",
        merge_lora: bool = True,
        trigger_word: str = "img",
        face_models: str | os.PathLike | None = None,
        arcface: str | os.PathLike | None = None,
        controlnets: Sequence[str | os.PathLike] = (),
    ) -> "PersonGenPipeline":
        """Loads converted folders: model_dir (unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2
        [, scheduler: default SDXL's Euler config]); the ID encoder from `photomaker`/id_encoder (default:
        model_dir's, if any); then `adapters`, then PhotoMaker's lora/ and `lora`, each merged into the base
        kernels unless merge_lora=False. dtype: compute dtype. face_models / arcface: the SCRFD folder and the
        converted ArcFace a PhotoMaker V2 encoder needs (`face_embedder`). controlnets: converted ControlNet
        folders (`weights_conversion controlnet`), checked against the UNet. PipelineError names a missing folder."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise PipelineError(f"{model_dir}: no such model folder")
        kw = dict(dtype=dtype, attention_impl=attention_impl)
        parts = {c: modeling.from_pretrained(_require(model_dir / c, c), **kw) for c in SDXL_COMPONENTS}
        pm = Path(photomaker) if photomaker else model_dir
        id_encoder = None
        if (pm / "id_encoder").is_dir():
            id_encoder = modeling.from_pretrained(_require(pm / "id_encoder", "id_encoder"), **kw)
        elif photomaker:
            raise PipelineError(
                f"{pm}: no id_encoder/ folder (convert PhotoMaker with "
                "`python -m weights_conversion photomaker SRC.bin DST`)"
            )
        # V2's face models load when first needed (a caller that passes id_embeds never loads them).
        face_embedder = None
        if getattr(id_encoder, "version", None) == "v2":
            width = id_encoder.config.id_embeddings_dim  # type: ignore[union-attr]
            face_embedder = lambda: load_face_embedder(
                face_models,
                arcface,
                id_embeddings_dim=width,  # noqa: E731
                where=pm / "id_encoder",
            )
        unet = parts["unet"]
        if adapters:
            lora_lib.load_adapters(unet, adapters)
        loras = [p for p in ([pm / "lora"] if (pm / "lora").is_dir() else []) + ([Path(lora)] if lora else [])]
        for path in loras:
            lora_lib.load_lora(unet, path)
            if merge_lora:  # inference: fold into the base kernels, no LoRA cost per step
                lora_lib.merge_lora(unet)
        scheduler_config = read_scheduler_config(model_dir, default=SDXL_SCHEDULER_CONFIG)
        cns = [load_controlnet(path, unet, parts["vae"], **kw) for path in controlnets]
        return cls(
            **parts,
            tokenizers=prompt_lib.load_tokenizers(model_dir, trigger_word),
            scheduler_config=scheduler_config,
            id_encoder=id_encoder,
            force_zeros_for_empty_prompt=prompt_lib.read_force_zeros_for_empty_prompt(model_dir),
            trigger_word=trigger_word,
            face_embedder=face_embedder,
            sample_size=int(modeling.read_config(model_dir / "unet").get("sample_size") or 128),
            controlnets=cns,
        )

    @classmethod
    def from_model(cls, model, tokenizers, scheduler_config: dict, **kw) -> "PersonGenPipeline":
        """From modules in memory (a training `PersonGenModel`: its `MODEL_MODULES`); LoRA stays unmerged, so
        later `nnx.update`s of the modules are what the pipeline samples with. kw: `__init__`'s settings
        (trigger_word, sample_size, conditions: the training config's (`conditions.from_config`),
        face_embedder: PhotoMaker V2's, ...)."""
        modules = {name: getattr(model, name) for name in MODEL_MODULES}
        return cls(**modules, tokenizers=tokenizers, scheduler_config=scheduler_config, **kw)

    def add_controlnets(self, paths: Sequence[str | os.PathLike]) -> None:
        """Loads converted ControlNet folders (checked against this UNet and VAE: `load_controlnet`) after the
        ones already loaded; compiled samplers are kept (their key names the ControlNets they run)."""
        dtype = getattr(self.unet, "dtype", None)
        self.controlnets += [load_controlnet(p, self.unet, self.vae, dtype=dtype) for p in paths]

    def add_t2i_adapter(self, path: str | os.PathLike) -> None:
        """Loads a converted T2I-Adapter folder (`weights_conversion t2i-adapter`), checked against this UNet and
        VAE (PipelineError, one line, listing the shapes)."""
        from persongen_jax.models.t2i_adapter import T2IAdapter, check_adapter_matches_unet

        path = Path(path)
        adapter = modeling.from_pretrained(
            _require(path, "T2I-Adapter (config.json)"), dtype=getattr(self.unet, "dtype", None)
        )
        if not isinstance(adapter, T2IAdapter):
            raise PipelineError(
                f"{path}: holds a {type(adapter).__name__}, not a T2I-Adapter (convert one with "
                "`python -m weights_conversion t2i-adapter SRC DST`)"
            )
        try:
            check_adapter_matches_unet(
                adapter.config, self.unet.config, self.vae.downscale_factor, name=f"{path}: this T2I-Adapter"
            )
        except ValueError as e:
            raise PipelineError(str(e)) from None
        self.t2i_adapter = adapter

    def t2i_features(self, image, *, height: int, width: int, scale: float = 1.0) -> tuple:
        """The loaded T2I-Adapter's features of `image` (PIL / uint8 array), resized to the output size as diffusers'
        adapter pipeline does (PIL Lanczos, [0, 1]), times `scale` -> tuple of [1, h_i, w_i, C_i]."""
        if self.t2i_adapter is None:
            raise PipelineError("an adapter image was given but no T2I-Adapter is loaded (--t2i-adapter DIR)")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise PipelineError(f"adapter conditioning scale {scale!r}: expected a finite number")
        grey = self.t2i_adapter.config.in_channels == 1
        pixels = prepare_control_image(image, height, width, mode="L" if grey else "RGB")
        return tuple(f * jnp.float32(scale) for f in self._t2i(self.t2i_adapter, jnp.asarray(pixels)))

    @property
    def default_size(self) -> int:
        """Height = width of an image when none is asked for: the UNet's sample_size x the VAE factor."""
        return self.sample_size * self.vae.downscale_factor

    @property
    def text_conditions(self) -> list[str]:
        """Names of the text conditions this model has adapters for (what `conditions=` may name)."""
        return [n for n, c in self.conditions.items() if c.kind == "text"]

    # ------------------------------------------------------------------ conditioning (host, once per call)

    def _plain(self, text: str):
        ids = [prompt_lib.tokenize(t, [text]) for t in self.tokenizers]
        return self._encode_text(self.text_encoder, self.text_encoder_2, jnp.asarray(ids[0]), jnp.asarray(ids[1]))

    def encode(
        self,
        prompt: str,
        ref_images: Sequence = (),
        *,
        negative_prompt: str | None = None,
        conditions: Mapping[str, str] | None = None,
        height: int,
        width: int,
        adapter_scales: dict | None = None,
        id_embeds=None,
        ref_names: Sequence[str] | None = None,
        controls: Sequence[ControlConditioning] = (),
    ) -> Conditioning:
        """Prompt (+ reference faces, + texts of text conditions {name: text}) -> Conditioning for
        `sampling.denoise` (batch 1, shared by all seeds). PhotoMaker V2: id_embeds [N, F] are the references'
        ArcFace embeddings (default: computed by `face_embedder`; ref_names name the photos in its errors).
        controls: the active ControlNets' inputs (`control_inputs`)."""
        ref_images = list(ref_images)
        texts = dict(conditions or {})
        embeds_of: dict[str, Any] = {}  # {condition name: its embedding}
        scales: dict[str, Any] = {}
        if ref_images:
            if self.id_encoder is None:
                raise PipelineError(
                    "reference images were given but the model has no ID encoder "
                    "(pass --photomaker DIR, a folder converted by `weights_conversion photomaker`)"
                )
            # V2 fuses num_tokens (2) ID tokens per image: the class word is repeated N * num_tokens times.
            num_tokens = getattr(self.id_encoder, "num_tokens", 1)
            batch = prompt_lib.make_prompt_batch(
                self.tokenizers, prompt, len(ref_images) * num_tokens, self.trigger_word
            )
            embeds, pooled = self._encode_text(
                self.text_encoder, self.text_encoder_2, jnp.asarray(batch.ids_1), jnp.asarray(batch.ids_2)
            )
            size = self.id_encoder.config.vision.image_size
            pixels = jnp.asarray(np.stack([clip_preprocess(im, size) for im in ref_images])[None])  # [1,N,H,W,3]
            extra = (
                (self._reference_id_embeds(ref_images, id_embeds, ref_names),)
                if getattr(self.id_encoder, "version", "v1") == "v2"
                else ()
            )
            fused = self._encode_id(self.id_encoder, pixels, embeds, jnp.asarray(batch.class_tokens_mask), *extra)
            text_only, text_only_pooled = self._encode_text(
                self.text_encoder,
                self.text_encoder_2,
                jnp.asarray(batch.text_only_ids_1),
                jnp.asarray(batch.text_only_ids_2),
            )
            if self.unet.image_proj is not None and extra:
                raise PipelineError(
                    "an identity adapter (image projection) takes PhotoMaker v1 ID embeddings; "
                    "the model's ID encoder is PhotoMaker V2"
                )
            if self.unet.image_proj is not None:  # an image adapter condition: identity tokens
                embeds_of[self.unet.image_proj.condition] = self.unet.image_proj(
                    self._id_embeds(self.id_encoder, pixels)
                )
        else:
            if self.trigger_word in prompt.split():
                raise PipelineError(
                    f"prompt {prompt!r} has the trigger word {self.trigger_word!r} but no "
                    "reference images were given (--ref FACE.jpg)"
                )
            fused, pooled = self._plain(prompt)
            text_only, text_only_pooled = fused, pooled
        for name, text in texts.items():
            if text is None:
                continue
            if name not in self.text_conditions:
                raise PipelineError(
                    f"condition {name!r} given but the model has no {name!r} text adapter (text "
                    f"conditions: {self.text_conditions}; pass --adapters DIR)"
                )
            embeds_of[name] = self._plain(text)[0]
        if self.adapters:
            for name in embeds_of:
                scales[name] = jnp.float32((adapter_scales or {}).get(name, self.adapters["scales"][name]))
        if prompt_lib.zero_negative(negative_prompt, self.force_zeros_for_empty_prompt):
            neg, neg_pooled = jnp.zeros_like(fused), jnp.zeros_like(pooled)
        else:
            neg, neg_pooled = self._plain(negative_prompt or "")
        return Conditioning(
            prompt_embeds=fused,
            pooled=pooled,
            text_only_embeds=text_only,
            text_only_pooled=text_only_pooled,
            negative_embeds=neg,
            negative_pooled=neg_pooled,
            time_ids=sdxl_time_ids(height, width),
            conditions=embeds_of,
            condition_scales=scales,
            gated=tuple(n for n, c in self.conditions.items() if c.gated),
            controls=tuple(controls),
        )

    def control_inputs(
        self,
        images: Sequence | None,
        *,
        height: int,
        width: int,
        scales: float | Sequence[float] = 1.0,
        guidance_start: float | Sequence[float] = 0.0,
        guidance_end: float | Sequence[float] = 1.0,
    ) -> tuple[tuple[int, ...], list]:
        """One control image per loaded ControlNet (None: that ControlNet is off) -> (indices of the active
        ControlNets, their ControlConditioning). A float for scales / start / end applies to every ControlNet
        (diffusers' rule). Images are resized to the output size as diffusers does (`prepare_control_image`)."""
        images = list(images or [])
        n = len(self.controlnets)
        if any(im is not None for im in images) and len(images) != n:
            raise PipelineError(
                f"{len(images)} control image(s) for {n} ControlNet(s): give one per ControlNet"
                + ("" if n else " (load one with --controlnet DIR)")
            )

        def per(value, what):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise PipelineError(f"{len(values)} {what} for {n} ControlNet(s): give one, or one per ControlNet")
            for v in values:
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise PipelineError(f"{what} {v!r}: expected a finite number")
            return [float(v) for v in values]

        scale_l, start_l, end_l = (
            per(scales, "control scale(s)"),
            per(guidance_start, "control guidance start(s)"),
            per(guidance_end, "control guidance end(s)"),
        )
        for a, b in zip(start_l, end_l):
            if not 0.0 <= a < b <= 1.0:
                raise PipelineError(
                    f"control guidance start {a} / end {b}: expected 0 <= start < end <= 1 (fractions of the steps)"
                )
        active = tuple(i for i, im in enumerate(images) if im is not None)
        controls = [
            ControlConditioning(
                image=jnp.asarray(prepare_control_image(images[i], height, width)),
                scale=jnp.float32(scale_l[i]),
                start=start_l[i],
                end=end_l[i],
            )
            for i in active
        ]
        return active, controls

    def face_id_embeds(self, ref_images: Sequence, ref_names: Sequence[str] | None = None) -> np.ndarray:
        """PhotoMaker V2: the references' raw ArcFace embeddings [N, F] (`face_embedder`, loaded on first use);
        PipelineError when the face models were not given or a reference has no face (named)."""
        if self.face_embedder is None:
            raise PipelineError(V2_NEEDS_FACE_MODELS)
        if isinstance(self.face_embedder, types.FunctionType):
            self.face_embedder = self.face_embedder()
        return embed_references(self.face_embedder, ref_images, ref_names)

    def _reference_id_embeds(self, ref_images: Sequence, id_embeds, ref_names) -> jax.Array:
        """PhotoMaker V2's id_embeds [1, N, F]: the given ones, or the references' ArcFace embeddings."""
        n, width = len(ref_images), self.id_encoder.config.id_embeddings_dim
        if id_embeds is None:
            id_embeds = self.face_id_embeds(ref_images, ref_names)
        id_embeds = np.asarray(id_embeds, np.float32)
        if id_embeds.shape != (n, width):
            raise PipelineError(
                f"id_embeds of shape {id_embeds.shape}: PhotoMaker V2 takes one {width}-d ArcFace "
                f"embedding per reference image ({n})"
            )
        return jnp.asarray(id_embeds[None])

    # ------------------------------------------------------------------ sampling

    def sampler(
        self,
        num_steps: int,
        scheduler: str = SamplingSettings.scheduler,
        progress: bool = False,
        controlnets: tuple[int, ...] = (),
    ):
        """The compiled sampler for (num_steps, scheduler, progress, active ControlNets by index), built once and
        cached: sample(noise [S, h, w, C] ~ N(0, 1), cond, guidance_scale, start_merge_step) -> images
        [S, H, W, 3] float32 in [0, 1] (`sampling.make_sampler`)."""
        key = (num_steps, scheduler, progress, tuple(controlnets))
        if key not in self._samplers:
            sched = scheduler_from_config(self.scheduler_config, scheduler)
            on_step = self._progress_step if progress else None
            self._samplers[key] = make_sampler(
                self.unet,
                self.vae,
                sched,
                num_steps,
                on_step=on_step,
                controlnets=[self.controlnets[i] for i in controlnets],
            )
        return self._samplers[key]

    def _progress_step(self, i) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __call__(
        self,
        prompt: str,
        ref_images: Sequence = (),
        *,
        seeds: Sequence[int] = (0,),
        num_steps: int = SamplingSettings.num_steps,
        guidance_scale: float = SamplingSettings.guidance_scale,
        start_merge_step: int | float = SamplingSettings.start_merge_step,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        conditions: Mapping[str, str] | None = None,
        scheduler: str = SamplingSettings.scheduler,
        adapter_scales: dict | None = None,
        progress: bool | Callable[[int], None] = False,
        id_embeds=None,
        ref_names: Sequence[str] | None = None,
        control_images: Sequence | None = None,
        control_scales: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        adapter_image=None,
        adapter_conditioning_scale: float = 1.0,
        adapter_conditioning_factor: float = 1.0,
    ) -> np.ndarray:
        """-> uint8 images [len(seeds), H, W, 3]. Seeds give the initial latents (jax.random.key(seed)).
        conditions: texts of the model's text conditions, e.g. {"bg": "in the mountains"} (P_bg).
        start_merge_step: the step index, or a fraction of num_steps (`resolve_start_merge_step`), after which
        the ID embedding is used. id_embeds / ref_names: PhotoMaker V2's ArcFace embeddings (`encode`).
        progress: True: a tqdm bar over the denoising steps; a callable: called as progress(steps_done) after
        each step (a web page's bar; it may run on a runtime thread, not the caller's). Both come from a host
        callback inside the compiled loop (one sampler program for either).
        control_images: one PIL image / uint8 array (or None: off) per loaded ControlNet; control_scales,
        control_guidance_start / _end: a float for all or one per ControlNet (diffusers' meaning).
        adapter_image: the loaded T2I-Adapter's input; its features times adapter_conditioning_scale act on the
        first int(num_steps * adapter_conditioning_factor) steps (diffusers' adapter pipeline)."""
        f = self.vae.downscale_factor
        SamplingSettings(
            seeds=tuple(seeds),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            start_merge_step=start_merge_step,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
        ).check(downscale_factor=f)
        start_merge_step = resolve_start_merge_step(start_merge_step, num_steps)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        active, controls = self.control_inputs(
            control_images,
            height=height,
            width=width,
            scales=control_scales,
            guidance_start=control_guidance_start,
            guidance_end=control_guidance_end,
        )
        cond = self.encode(
            prompt,
            ref_images,
            negative_prompt=negative_prompt,
            conditions=conditions,
            height=height,
            width=width,
            adapter_scales=adapter_scales,
            id_embeds=id_embeds,
            ref_names=ref_names,
            controls=controls,
        )
        if adapter_image is not None:
            if not (
                isinstance(adapter_conditioning_factor, (int, float)) and 0.0 <= adapter_conditioning_factor <= 1.0
            ):
                raise PipelineError(
                    f"adapter conditioning factor {adapter_conditioning_factor!r}: expected a "
                    "fraction of the steps in [0, 1]"
                )
            cond = cond.replace(  # type: ignore[attr-defined]  # flax.struct.dataclass
                t2i_features=self.t2i_features(
                    adapter_image, height=height, width=width, scale=adapter_conditioning_scale
                ),
                t2i_steps=jnp.int32(int(num_steps * adapter_conditioning_factor)),
            )
        shape = (height // f, width // f, self.unet.config.in_channels)
        noise = jnp.stack([jax.random.normal(jax.random.key(int(s)), shape) for s in seeds])
        sample = self.sampler(num_steps, scheduler, bool(progress), active)
        if callable(progress):
            self._bar = _StepCallback(progress)
        elif progress:
            self._bar = tqdm(total=num_steps, desc=f"sampling {len(seeds)} image(s)", disable=None)
        try:
            images = np.asarray(sample(noise, cond, guidance_scale, start_merge_step))
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
        if not finite.all():  # would be saved as black pixels, silently
            bad = [int(s) for s, ok in zip(seeds, finite) if not ok]
            raise PipelineError(
                f"the decoded image of seed(s) {bad} holds NaN/Inf values (non-finite model weights, "
                "or settings out of the model's range); nothing was saved for them"
            )
        return np.round(images * 255).astype(np.uint8)
