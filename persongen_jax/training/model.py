"""Model assembly from a config: SDXL parts + PhotoMaker ID encoder + LoRA + adapters.

    model, tokenizers, scheduler = build_model(config, workdir)

`config.model == "tiny"` (or "micro", an even smaller UNet for tests): random tiny SDXL parts (`persongen_jax.testing.tiny_sdxl` shapes, a tiny
CLIP tokenizer written into `workdir/tokenizers`) and the "tiny" PhotoMaker ID encoder preset
(fuse width 64 = the tiny prompt width); `config.init.*` folders are ignored.
Otherwise: `config.init.sdxl` (a converted SDXL folder: unet, vae, text_encoder(_2), tokenizer(_2)),
`config.init.photomaker` (id_encoder/ [+ lora/]; without it a random ID encoder of the PhotoMaker v1
shape, as the research's "from CLIP" runs start from CLIP ViT-L/14 -- give its folder as
`config.init.id_encoder`), `config.init.ip_adapter` (an adapters folder).

Then LoRA (`config.lora.rank` > 0) and adapters (`config.adapters.names`; an `id` adapter gets an
`ImageProjection` head when `config.id_injection` is cross_attn or both).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from persongen_jax.models import lora as lora_lib
from persongen_jax.models import modeling
from persongen_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from persongen_jax.models.id_encoder import PhotoMakerIDEncoder
from persongen_jax.models.unet import UNet2DConditionModel
from persongen_jax.models.vae import AutoencoderKL
from persongen_jax.pipeline import prompt as prompt_lib
from persongen_jax.pipeline.pipeline import DEFAULT_SCHEDULER
from persongen_jax.pipeline.schedulers import EulerDiscreteScheduler, read_scheduler_config

ID_INJECTIONS = ("text", "cross_attn", "both")
# "micro": the tiny UNet with one resnet / one transformer layer per block (same widths, same
# conditioning): a train step that compiles in about half the time, for the per-config tests.
MICRO_UNET = {"sample_size": 16, "in_channels": 4, "out_channels": 4,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64],
              "layers_per_block": 1, "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 1],
              "cross_attention_dim": 64, "use_linear_projection": True, "addition_embed_type": "text_time",
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8}


class PersonGenModel(nnx.Module):
    """Everything one train step runs; attribute names are the first component of every param path
    (`unet.…`, `vae.…`, `text_encoder.…`, `text_encoder_2.…`, `id_encoder.…`) that the trainable-group
    regexes of the config match."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2, id_encoder):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.id_encoder = id_encoder


def random_init(cls, cfg, seed: int, **kw):
    """A randomly initialised model built without per-parameter device dispatch: the module is created
    abstractly (`nnx.eval_shape`), then every parameter is drawn on the host with numpy (seeded):
    kernels / embeddings ~ N(0, 1/fan_in), norm scales 1, biases 0. Eager NNX init of even the tiny
    models costs ~20 s of op dispatch on a small CPU; this takes well under a second."""
    import numpy as np

    model = modeling.abstract_model(cls, cfg, **kw)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sds in modeling.flat_params(model).items():
        shape = tuple(sds.shape)
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        elif str(path[-1]) == "scale":
            value = np.ones(shape, np.float32)
        elif str(path[-1]) == "bias":
            value = np.zeros(shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        flat[path] = jnp.asarray(value, dtype=sds.dtype)
    return modeling.assign_params(model, flat)


def _dtype(name: str):
    return {"float32": None, "bfloat16": jnp.bfloat16}[name]


def build_model(config, workdir: str | Path):
    """-> (PersonGenModel, (tokenizer, tokenizer_2), EulerDiscreteScheduler (training noise schedule))."""
    workdir = Path(workdir)
    dtype = _dtype(config.dtype)
    rngs = nnx.Rngs(config.seed)
    if config.id_injection not in ID_INJECTIONS:
        raise ValueError(f"config.id_injection={config.id_injection!r}; expected one of {list(ID_INJECTIONS)}")
    kw = dict(dtype=dtype, attention_impl=config.attention_impl)
    photomaker_lora = None
    if config.model in ("tiny", "micro"):
        from persongen_jax.testing import tiny_sdxl

        if any(config.init.get(k) for k in ("sdxl", "photomaker", "ip_adapter", "id_encoder")):
            logging.info("config.model='tiny': ignoring config.init (random tiny weights)")
        s = config.seed
        unet_cfg = tiny_sdxl.UNET if config.model == "tiny" else MICRO_UNET
        unet = random_init(UNet2DConditionModel, unet_cfg, s, **kw)
        vae = random_init(AutoencoderKL, tiny_sdxl.VAE, s + 1, **kw)
        te1 = random_init(CLIPTextModel, tiny_sdxl.TEXT_ENCODER, s + 2, **kw)
        te2 = random_init(CLIPTextModelWithProjection, tiny_sdxl.TEXT_ENCODER_2, s + 3, **kw)
        id_enc = random_init(PhotoMakerIDEncoder, PhotoMakerIDEncoder.preset_config("tiny"), s + 4, **kw)
        tok_dir = workdir / "tokenizers"
        if not (tok_dir / "tokenizer_2").is_dir():
            tiny_sdxl.write_tiny_tokenizer(tok_dir / "tokenizer")
            tiny_sdxl.write_tiny_tokenizer(tok_dir / "tokenizer_2", pad_token="!")
        tokenizers = prompt_lib.load_tokenizers(tok_dir, config.data.trigger_word)
        scheduler = EulerDiscreteScheduler.from_config(tiny_sdxl.SCHEDULER)
        ip_adapter = None
    elif config.model == "sdxl":
        sdxl = Path(config.init.sdxl or "")
        if not config.init.sdxl or not sdxl.is_dir():
            raise ValueError(f"config.init.sdxl={config.init.sdxl!r}: give a converted SDXL folder "
                             "(`python -m weights_conversion sdxl ...`), or --config.model=tiny")
        unet, vae, te1, te2 = (modeling.from_pretrained(sdxl / c, **kw)
                               for c in ("unet", "vae", "text_encoder", "text_encoder_2"))
        tokenizers = prompt_lib.load_tokenizers(sdxl, config.data.trigger_word)
        try:
            scheduler = EulerDiscreteScheduler.from_config(read_scheduler_config(sdxl))
        except FileNotFoundError:
            scheduler = EulerDiscreteScheduler.from_config(DEFAULT_SCHEDULER)
        pm = Path(config.init.photomaker) if config.init.photomaker else None
        if pm is not None:
            id_enc = modeling.from_pretrained(pm / "id_encoder", **kw)
            if config.init.photomaker_lora and (pm / "lora").is_dir():
                photomaker_lora = pm / "lora"
        elif config.init.get("id_encoder"):
            id_enc = modeling.from_pretrained(config.init.id_encoder, **kw)
        else:
            logging.warning("no config.init.photomaker / id_encoder: the ID encoder starts random")
            id_enc = random_init(PhotoMakerIDEncoder, PhotoMakerIDEncoder.preset_config("photomaker_v1"),
                                 config.seed + 4, **kw)
        ip_adapter = config.init.ip_adapter or None
    else:
        raise ValueError(f"config.model={config.model!r}; expected 'sdxl', 'tiny' or 'micro'")

    # Adapters first: `copy_lora` copies LoRA of to_k/to_v into them, so LoRA must exist first then.
    ad = config.adapters
    names = tuple(ad.names)
    copy_lora = bool(ad.copy_lora)

    def add_lora():
        if photomaker_lora is not None:
            lora_lib.load_lora(unet, photomaker_lora)
        elif config.lora.rank > 0:
            lora_lib.add_lora(unet, config.lora.rank, config.lora.alpha or None, tuple(config.lora.targets),
                              rngs=rngs)

    if copy_lora:
        add_lora()
    if ip_adapter:
        lora_lib.load_adapters(unet, ip_adapter)
    elif names:
        image_projection = None
        if config.id_injection in ("cross_attn", "both"):
            if "id" not in names:
                raise ValueError(f"config.id_injection={config.id_injection!r} needs 'id' in config.adapters.names "
                                 f"(got {list(names)})")
            image_projection = {"condition": "id", "image_embed_dim": id_enc.config.embed_dim,
                                "num_tokens": ad.num_tokens}
        scales = dict(zip(names, ad.scales)) if ad.scales else 1.0
        lora_lib.add_adapters(unet, names, mode=ad.mode, scales=scales, copy_lora=copy_lora,
                              image_projection=image_projection, rngs=rngs)
    elif config.id_injection != "text":
        raise ValueError(f"config.id_injection={config.id_injection!r} needs adapters (config.adapters.names "
                         "with 'id')")
    if not copy_lora:
        add_lora()
    return PersonGenModel(unet, vae, te1, te2, id_enc), tokenizers, scheduler
