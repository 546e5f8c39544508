"""Model assembly from a config: SDXL parts + PhotoMaker ID encoder + LoRA + adapters.

    model, tokenizers, scheduler = build_model(config, workdir)

`config.model` a model size of `persongen_jax.models.presets` ("tiny", "micro" -- an even smaller UNet for
tests --, "sdxl_base"): random weights in that size's shapes (the tiny CLIP tokenizer written into
`workdir/tokenizers`); `config.init.*` folders are ignored.
Otherwise: `config.init.sdxl` (a converted SDXL folder: unet, vae, text_encoder(_2), tokenizer(_2)),
`config.init.photomaker` (id_encoder/ [+ lora/]; without it a random ID encoder of the PhotoMaker v1
shape, as the research's "from CLIP" runs start from CLIP ViT-L/14 -- give its folder as
`config.init.id_encoder`), `config.init.ip_adapter` (an adapters folder). PhotoMaker V2 reads
`config.init.arcface` at every size (a model size then sizes its random encoder for that ArcFace's width).

Then LoRA (`config.lora.rank` > 0) and adapters (`config.adapters.names`; an `id` adapter gets an
`ImageProjection` head when `config.id_injection` is cross_attn or both).

PhotoMaker V2 (`config.id_encoder = "photomaker_v2"`, `configs/photomaker_v2.py`): the ID encoder is a
`PhotoMakerV2IDEncoder` (config.init.photomaker: a converted V2 folder; random: the size's V2 preset), and the
model holds a frozen ArcFace (`arcface`: config.init.arcface, a converted IResNet folder; a model size: a random
tiny IResNet) that embeds the references whose records carry no ArcFace embedding (`id_inputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from persongen_jax import conditions as conditions_lib
from persongen_jax.data.pipeline import IdInputs
from persongen_jax.evaluation.id_embeds import CropEmbedder
from persongen_jax.models import iresnet, modeling, presets
from persongen_jax.models import lora as lora_lib
from persongen_jax.models import unet as unet_lib
from persongen_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from persongen_jax.models.id_encoder import PhotoMakerIDEncoder
from persongen_jax.models.id_encoder_v2 import PhotoMakerV2IDEncoder
from persongen_jax.models.unet import UNet2DConditionModel
from persongen_jax.models.vae import AutoencoderKL
from persongen_jax.pipeline import SDXL_SCHEDULER_CONFIG
from persongen_jax.pipeline import prompt as prompt_lib
from persongen_jax.pipeline.pipeline import PersonGenPipeline, load_face_embedder
from persongen_jax.pipeline.schedulers import EulerDiscreteScheduler, read_scheduler_config

ID_INJECTIONS = ("text", "cross_attn", "both")
# config.id_encoder (absent in the v1 configs: PhotoMaker v1) -> the ID encoder class.
ID_ENCODERS = {"photomaker_v1": PhotoMakerIDEncoder, "photomaker_v2": PhotoMakerV2IDEncoder}


class PersonGenModel(nnx.Module):
    """Everything one train step runs; attribute names are the first component of every param path
    (`unet.…`, `vae.…`, `text_encoder.…`, `text_encoder_2.…`, `id_encoder.…`, `arcface.…`) that the
    trainable-group regexes of the config match. arcface: PhotoMaker V2's frozen ArcFace IResNet, or None."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2, id_encoder, arcface=None):
        self.unet, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.id_encoder, self.arcface = id_encoder, arcface  # the ID encoder and V2's ArcFace for it


def scheduler_config(config) -> dict:
    """The diffusers scheduler config of a training config's model: the converted SDXL folder's, else
    (random models, folders converted without one) SDXL base's."""
    return read_scheduler_config(config.init.sdxl if config.model == "sdxl" else None, default=SDXL_SCHEDULER_CONFIG)


def _dtype(name: str):
    return {"float32": None, "bfloat16": jnp.bfloat16}[name]


def id_encoder_kind(config) -> str:
    """config.id_encoder ("photomaker_v1" when the config has no such key: every v1 config); ValueError else."""
    kind = config.get("id_encoder", "photomaker_v1")
    if kind not in ID_ENCODERS:
        raise ValueError(f"config.id_encoder={kind!r}; expected one of {sorted(ID_ENCODERS)}")
    return kind


def id_inputs(model) -> IdInputs:
    """The data pipeline's `IdInputs` for a PersonGenModel: PhotoMaker V2's tokens per image, ArcFace width and
    (with the model's frozen ArcFace) its input size; v1: IdInputs()."""
    enc = model.id_encoder
    if getattr(enc, "version", "v1") != "v2":
        return IdInputs()
    arcface = getattr(model, "arcface", None)
    return IdInputs(
        num_tokens=enc.num_tokens,
        embed_dim=enc.config.id_embeddings_dim,
        arcface_size=arcface.config.input_size if arcface is not None else 0,
    )


def _load_arcface(config, dtype) -> iresnet.IResNet:
    """config.init.arcface's converted IResNet; ValueError naming the key when it is another model."""
    arcface = modeling.from_pretrained(config.init.arcface, dtype=dtype)
    if not isinstance(arcface, iresnet.IResNet):
        raise ValueError(
            f"config.init.arcface={config.init.arcface!r}: expected a converted ArcFace IResNet folder "
            f"(`python -m weights_conversion arcface w600k_r50.onnx DST`), found {type(arcface).__name__}"
        )
    return arcface


def build_model(config, workdir: str | Path, *, abstract: bool = False):
    """-> (PersonGenModel, (tokenizer, tokenizer_2), EulerDiscreteScheduler (training noise schedule)).
    abstract: for a model size, build with the modules' own initialisers, to be called under `nnx.eval_shape`
    (scripts/bench/scale.py AOT-compiles sdxl_base this way: shapes only, nothing allocated; the default
    path draws the weights with numpy on the host, which no tracing can make abstract)."""
    workdir = Path(workdir)
    dtype = _dtype(config.dtype)
    rngs = nnx.Rngs(config.seed)
    if config.id_injection not in ID_INJECTIONS:
        raise ValueError(f"config.id_injection={config.id_injection!r}; expected one of {list(ID_INJECTIONS)}")
    kw = dict(dtype=dtype, attention_impl=config.attention_impl)
    kind = id_encoder_kind(config)
    v2 = kind == "photomaker_v2"
    if v2 and config.id_injection != "text":
        raise ValueError(
            f"config.id_injection={config.id_injection!r}: the PhotoMaker V2 ID encoder injects the "
            "identity through the prompt only (id_injection='text')"
        )
    arcface = None
    photomaker_lora = None
    if config.model in presets.SIZES:  # random weights in a model size's shapes (demo, tests, scale.py)
        if any(config.init.get(k) for k in ("sdxl", "photomaker", "ip_adapter", "id_encoder")):
            logging.info(
                "config.model=%r: ignoring config.init (random weights; PhotoMaker V2 still reads config.init.arcface)",
                config.model,
            )
        s = config.seed
        size = presets.get(config.model)
        # abstract: the modules' own initialisers, traced by the caller's nnx.eval_shape (no memory).
        init = (
            (lambda cls, cfg, seed, **k: cls.from_config(dict(cfg), rngs=nnx.Rngs(seed), **k))
            if abstract
            else modeling.random_init
        )
        unet = init(UNet2DConditionModel, size.unet, s, **kw)
        vae = init(AutoencoderKL, size.vae, s + 1, **kw)
        te1 = init(CLIPTextModel, size.text_encoder, s + 2, **kw)
        te2 = init(CLIPTextModelWithProjection, size.text_encoder_2, s + 3, **kw)
        if v2:  # the V2 preset at this size: the published one for sdxl_base, else the tiny one
            v2_cfg = PhotoMakerV2IDEncoder.preset_config("photomaker_v2" if config.model == "sdxl_base" else "tiny")
            if config.init.get("arcface") and not abstract:
                # a converted ArcFace (e.g. the one a data.build dataset was embedded with): its embedding width
                # sizes the random encoder's token projection, so the records' stored embeddings fit
                arcface = _load_arcface(config, dtype)
                v2_cfg["id_embeddings_dim"] = arcface.config.num_features
            else:
                arcface_cfg = iresnet.IResNet.preset_config("r50" if config.model == "sdxl_base" else "tiny")
                arcface = (
                    init(iresnet.IResNet, arcface_cfg, s + 5, dtype=dtype)
                    if abstract
                    else iresnet.random_iresnet(arcface_cfg, s + 5, dtype=dtype)
                )
            id_enc = init(PhotoMakerV2IDEncoder, v2_cfg, s + 4, **kw)
        else:
            id_enc = init(PhotoMakerIDEncoder, size.id_encoder, s + 4, **kw)
        tok_dir = workdir / "tokenizers"
        if not (tok_dir / "tokenizer_2").is_dir():
            presets.write_tiny_tokenizer(tok_dir / "tokenizer")
            presets.write_tiny_tokenizer(tok_dir / "tokenizer_2", pad_token="!")
        tokenizers = prompt_lib.load_tokenizers(tok_dir, config.data.trigger_word)
        ip_adapter = None
    elif abstract:
        raise ValueError(
            f"config.model={config.model!r}: an abstract build needs a model size ({sorted(presets.SIZES)})"
        )
    elif config.model == "sdxl":
        sdxl = Path(config.init.sdxl or "")
        if not config.init.sdxl or not sdxl.is_dir():
            raise ValueError(
                f"config.init.sdxl={config.init.sdxl!r}: give a converted SDXL folder "
                "(`python -m weights_conversion sdxl ...`), or --config.model=tiny"
            )
        unet, vae, te1, te2 = (
            modeling.from_pretrained(sdxl / c, **kw) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
        )
        tokenizers = prompt_lib.load_tokenizers(sdxl, config.data.trigger_word)
        pm = Path(config.init.photomaker) if config.init.photomaker else None
        if pm is not None:
            id_enc = modeling.from_pretrained(pm / "id_encoder", **kw)
            if config.init.photomaker_lora and (pm / "lora").is_dir():
                photomaker_lora = pm / "lora"
        elif config.init.get("id_encoder"):
            id_enc = modeling.from_pretrained(config.init.id_encoder, **kw)
        else:
            logging.warning("no config.init.photomaker / id_encoder: the ID encoder starts random")
            id_enc = modeling.random_init(
                ID_ENCODERS[kind],
                presets.get("sdxl_base").id_encoder if not v2 else PhotoMakerV2IDEncoder.preset_config("photomaker_v2"),
                config.seed + 4,
                **kw,
            )
        if not isinstance(id_enc, ID_ENCODERS[kind]):
            raise ValueError(
                f"config.id_encoder={kind!r}, but config.init.photomaker / id_encoder holds a "
                f"{type(id_enc).__name__} (PhotoMaker {getattr(id_enc, 'version', 'v1')})"
            )
        if v2 and config.init.get("arcface"):
            arcface = _load_arcface(config, dtype)
            if arcface.config.num_features != id_enc.config.id_embeddings_dim:
                raise ValueError(
                    f"config.init.arcface={config.init.arcface!r}: ArcFace embeddings of width "
                    f"{arcface.config.num_features}, but the PhotoMaker V2 encoder takes "
                    f"{id_enc.config.id_embeddings_dim}"
                )
        ip_adapter = config.init.ip_adapter or None
    else:
        raise ValueError(
            f"config.model={config.model!r}; expected 'sdxl' (weights from config.init) or a model size "
            f"with random weights, one of {sorted(presets.SIZES)}"
        )

    scheduler = EulerDiscreteScheduler.from_config(scheduler_config(config))

    # Adapters first: `copy_lora` copies LoRA of to_k/to_v into them, so LoRA must exist first then.
    ad = config.adapters
    specs = conditions_lib.from_config(config)
    names = tuple(ad.names)
    copy_lora = bool(ad.copy_lora)

    def add_lora():
        if photomaker_lora is not None:
            lora_lib.load_lora(unet, photomaker_lora)
        elif config.lora.rank > 0:
            lora_lib.add_lora(unet, config.lora.rank, config.lora.alpha or None, tuple(config.lora.targets), rngs=rngs)

    if copy_lora:
        add_lora()
    if ip_adapter:
        lora_lib.load_adapters(unet, ip_adapter)
    elif names:
        image_projection = None
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise ValueError(
                f"config.adapters.names {unknown}: no such condition in config.conditions ({sorted(specs)})"
            )
        if config.id_injection in ("cross_attn", "both"):
            identity = conditions_lib.image_condition(specs)
            if identity is None or identity.name not in names:
                raise ValueError(
                    f"config.id_injection={config.id_injection!r} needs the image condition "
                    f"({identity.name if identity else 'none declared'}) in config.adapters.names "
                    f"(got {list(names)})"
                )
            image_projection = {
                "condition": identity.name,
                "image_embed_dim": id_enc.config.embed_dim,
                "num_tokens": ad.num_tokens,
            }
        scales = dict(zip(names, ad.scales)) if ad.scales else 1.0
        lora_lib.add_adapters(
            unet, names, mode=ad.mode, scales=scales, copy_lora=copy_lora, image_projection=image_projection, rngs=rngs
        )
    elif config.id_injection != "text":
        raise ValueError(
            f"config.id_injection={config.id_injection!r} needs adapters (config.adapters.names "
            "with the image condition)"
        )
    if not copy_lora:
        add_lora()
    unet_lib.check_remat(config.remat)
    unet.remat = config.remat
    return PersonGenModel(unet, vae, te1, te2, id_enc, arcface), tokenizers, scheduler


def inference_pipeline(
    model, tokenizers, config, *, merge_lora: bool = True, face_models=None, arcface=None
) -> PersonGenPipeline:
    """A training model of `config` (`build_model`, or restored) as a PersonGenPipeline with the config's
    scheduler, trigger word, resolution and conditions. merge_lora: fold LoRA into the base kernels (no
    LoRA cost per step); False keeps the modules as they are, so later `nnx.update`s are what it samples.

    PhotoMaker V2: the references' ArcFace embeddings come from `face_models` + `arcface` (SCRFD + a converted
    IResNet, as for converted folders) when both are given, else from the model's own frozen ArcFace on the
    reference images taken as face crops (`evaluation.id_embeds.CropEmbedder`: what training computes for
    records without a stored embedding)."""
    if merge_lora and config.lora.rank > 0:
        lora_lib.merge_lora(model.unet)
    face_embedder: Any = None
    if getattr(model.id_encoder, "version", "v1") == "v2":
        width = model.id_encoder.config.id_embeddings_dim
        if face_models and arcface:
            face_embedder = lambda: load_face_embedder(
                face_models,
                arcface,
                id_embeddings_dim=width,  # noqa: E731
                where="the run's PhotoMaker V2 encoder",
            )
        elif getattr(model, "arcface", None) is not None:
            face_embedder = CropEmbedder(model.arcface)
    return PersonGenPipeline.from_model(
        model,
        tokenizers,
        scheduler_config(config),
        trigger_word=config.data.trigger_word,
        sample_size=config.data.resolution // model.vae.downscale_factor,
        conditions=conditions_lib.from_config(config),
        face_embedder=face_embedder,
    )
