"""A tiny random SDXL pipeline folder in diffusers layout (PyTorch reference weights), built offline.

    make_tiny_sdxl(dst)  ->  dst/model_index.json, unet/, vae/, text_encoder/,
                             text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/

The shapes are the `tiny` model size of `persongen_jax.models.presets` (one place for them; the names
below are aliases kept for the tests and scripts that use them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from persongen_jax.models import presets
from persongen_jax.models.presets import TEXT_HIDDEN, VOCAB_SIZE, WORDS, write_tiny_tokenizer  # noqa: F401
from persongen_jax.pipeline import SDXL_SCHEDULER_CONFIG

_TINY = presets.get("tiny")
TEXT_ENCODER, TEXT_ENCODER_2 = _TINY.text_encoder, _TINY.text_encoder_2
UNET, VAE = _TINY.unet, _TINY.vae
SCHEDULER = {k: v for k, v in SDXL_SCHEDULER_CONFIG.items() if not k.startswith("_")}


def _randomize(module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.01), biases N(0, 0.01): no zero/one init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def make_tiny_sdxl(dst: str | Path, seed: int = 0) -> Path:
    """Writes the tiny random SDXL folder at `dst` and returns it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel(**UNET),
        "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
    }
    for i, (name, model) in enumerate(models.items()):
        _randomize(model, seed + i)
        model.save_pretrained(dst / name)
    EulerDiscreteScheduler(
        **{
            k: v
            for k, v in SCHEDULER.items()
            if k not in ("clip_sample", "sample_max_value", "set_alpha_to_one", "skip_prk_steps")
        }
    ).save_pretrained(dst / "scheduler")
    write_tiny_tokenizer(dst / "tokenizer")
    write_tiny_tokenizer(dst / "tokenizer_2", pad_token="!")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def make_tiny_controlnet(dst: str | Path, seed: int = 0, unet: dict | None = None) -> Path:
    """Writes a random diffusers ControlNetModel folder for the tiny UNet (or the UNet config `unet`) at `dst`:
    the UNet's encoder shapes, a 2-step conditioning embedding (control images at 2x the latent size, the
    tiny VAE's factor), every weight random (the zero convolutions too). Returns `dst`."""
    from persongen_jax.models.controlnet import ControlNetModel
    from persongen_jax.testing.torch_init import allow_torchvision_import

    allow_torchvision_import()
    from diffusers import ControlNetModel as TorchControlNet

    cfg = ControlNetModel.config_for_unet(unet or UNET, conditioning_embedding_out_channels=[8, 16])
    model = TorchControlNet(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    _randomize(model, seed)
    dst = Path(dst)
    model.save_pretrained(dst)
    return dst
