"""A tiny random PhotoMaker v1 or V2 checkpoint (`{'id_encoder': ..., 'lora_weights': ...}` .bin), offline.

The id_encoder tensors have PhotoMaker's key names and the shapes of
`PhotoMakerIDEncoder.preset_config("tiny")` (fuse width 64 = the tiny SDXL text
width); the LoRA covers to_q/to_k/to_v/to_out.0 of every attention of the tiny
SDXL UNet (`tiny_sdxl.UNET`) in diffusers/PEFT key style (`unet.<path>.lora_A.weight`).
Weights ~ N(0, 1/fan_in) (LoRA up-projections too: a zero LoRA would hide bugs).
"""

from __future__ import annotations

import math
from pathlib import Path


def _randn(g, *shape):
    import torch

    return torch.randn(shape, generator=g) / math.sqrt(shape[-1] if len(shape) > 1 else 1)


def id_encoder_state_dict(seed: int = 0) -> dict:
    import torch
    import transformers

    from persongen_jax.models.id_encoder import PhotoMakerIDEncoder

    cfg = PhotoMakerIDEncoder.preset_config("tiny")
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg["vision_config"]))
    sd = {k: v for k, v in vision.state_dict().items() if not k.endswith("position_ids")}
    g = torch.Generator().manual_seed(seed)
    for k in sd:  # default init has unit norm scales / zero biases: perturb everything
        sd[k] = sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)
    hidden = cfg["vision_config"]["hidden_size"]
    d = cfg["vision_config"]["projection_dim"] + cfg["projection_dim_2"]
    sd["visual_projection_2.weight"] = _randn(g, cfg["projection_dim_2"], hidden)
    for name, din in (("mlp1", 2 * d), ("mlp2", d)):
        p = f"fuse_module.{name}"
        sd[f"{p}.layernorm.weight"] = 1 + 0.1 * torch.randn(din, generator=g)
        sd[f"{p}.layernorm.bias"] = 0.1 * torch.randn(din, generator=g)
        sd[f"{p}.fc1.weight"] = _randn(g, d, din)
        sd[f"{p}.fc1.bias"] = 0.1 * torch.randn(d, generator=g)
        sd[f"{p}.fc2.weight"] = _randn(g, d, d)
        sd[f"{p}.fc2.bias"] = 0.1 * torch.randn(d, generator=g)
    sd["fuse_module.layer_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    sd["fuse_module.layer_norm.bias"] = 0.1 * torch.randn(d, generator=g)
    return sd


def id_encoder_v2_state_dict(seed: int = 0, preset: str = "tiny") -> dict:
    """A PhotoMaker V2 `id_encoder` state dict with the official key names and the shapes of
    `PhotoMakerV2IDEncoder.preset_config(preset)`: matrices ~ N(0, 1/fan_in), norms 1 + 0.1 N(0, 1),
    biases and embeddings 0.1 N(0, 1) (nothing at its default init)."""
    import numpy as np
    import torch

    from persongen_jax.models import modeling
    from persongen_jax.models.id_encoder_v2 import PhotoMakerV2IDEncoder
    from weights_conversion.core import to_torch_layout, torch_key

    cfg = PhotoMakerV2IDEncoder.preset_config(preset)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, sds in sorted(
        modeling.flat_params(modeling.abstract_model(PhotoMakerV2IDEncoder, cfg)).items(),
        key=lambda kv: torch_key(kv[0]),
    ):
        shape = to_torch_layout(path, np.empty(sds.shape, bool)).shape
        if len(shape) >= 2:
            sd[torch_key(path)] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif str(path[-1]) == "scale":
            sd[torch_key(path)] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[torch_key(path)] = 0.1 * torch.randn(shape, generator=g)
    return sd


def unet_lora_state_dict(rank: int = 4, seed: int = 0, prefix: str = "unet.") -> dict:
    """PEFT-style LoRA for every attention projection of the tiny SDXL UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from persongen_jax.testing.tiny_sdxl import UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for name, module in unet.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0")
            and (".attn1." in name or ".attn2." in name)
        ):
            if name.endswith(".0") and not name.endswith("to_out.0"):
                continue
            sd[f"{prefix}{name}.lora_A.weight"] = _randn(g, rank, module.in_features)
            sd[f"{prefix}{name}.lora_B.weight"] = _randn(g, module.out_features, rank) * 0.5
    return sd


def make_tiny_photomaker(dst: str | Path, seed: int = 0, lora: bool = True, version: str = "v1") -> Path:
    """Writes the tiny checkpoint (version "v1" or "v2") to `dst` (a .bin path) and returns it."""
    import torch

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    encoder = {"v1": id_encoder_state_dict, "v2": id_encoder_v2_state_dict}[version](seed)
    torch.save({"id_encoder": encoder, "lora_weights": unet_lora_state_dict(seed=seed) if lora else {}}, dst)
    return dst
