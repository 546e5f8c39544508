"""`--verify`: the PyTorch reference and the converted Flax model on the same random inputs.

Both run in float32 (highest matmul precision, TF32 off). The PyTorch model is
run and freed before the Flax one is loaded, so a full SDXL UNet fits in RAM.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from persongen_jax.models import modeling


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _nhwc(x):
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def reference_inputs(name: str, config: dict, seed: int = 0, latent_hw=(32, 32), batch: int = 1) -> dict:
    """Random inputs (channels-last numpy) that exercise every part of the model."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    if name in ("UNet2DConditionModel", "ControlNetModel"):
        h, w = latent_hw
        cross = config.get("cross_attention_dim", 2048)
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        out = {
            "sample": f(batch, h, w, config.get("in_channels", 4)),
            "timesteps": np.linspace(0, 999, batch).astype(np.int32),
            "encoder_hidden_states": f(batch, 77, cross),
        }
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            out["text_embeds"] = f(batch, pooled)
            out["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1))
        if name == "ControlNetModel":  # the control image, at the conditioning embedding's scale of the latents
            from persongen_jax.models.controlnet import ControlNetConfig

            f = ControlNetConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")}).downscale_factor
            out["controlnet_cond"] = rng.random(
                (batch, f * h, f * w, config.get("conditioning_channels", 3)), dtype=np.float32
            )
        return out
    if name == "AutoencoderKL":
        return {"images": np.clip(f(batch, 64, 64, config.get("in_channels", 3)) * 0.5, -1, 1)}
    if name == "ViTModel":
        size = config.get("image_size", 224)
        return {"pixel_values": f(batch, size, size, config.get("num_channels", 3))}
    if name == "T2IAdapter":  # an image at 2 x 2 of the adapter's last features (odd sizes: the ceil pool)
        size = 2 * 2 * config.get("downscale_factor", 16)
        return {
            "image": rng.random(
                (batch, size, size + config.get("downscale_factor", 16), config.get("in_channels", 3)), dtype=np.float32
            )
        }
    text = config.get("text_config", config)
    vision = config.get("vision_config", config)
    out = {}
    if "Text" in name or name == "CLIPModel":
        vocab = text.get("vocab_size", 49408)
        length = min(16, text.get("max_position_embeddings", 77))
        ids = rng.integers(1, vocab - 2, size=(batch, length))
        eos = text.get("eos_token_id", 2)
        # Legacy configs (eos_token_id 2) pool at argmax(id): put the largest id last.
        ids[:, -1] = eos if (eos != 2 and eos < vocab) else vocab - 1
        out["input_ids"] = ids.astype(np.int32)
    if "Vision" in name or name == "CLIPModel":
        size = vision.get("image_size", 224)
        out["pixel_values"] = f(batch, size, size, vision.get("num_channels", 3))
    return out


def run_torch(name: str, folder: Path, inputs: dict, variant=None) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    T = lambda x: torch.from_numpy(np.asarray(x))
    kw = {"torch_dtype": torch.float32}
    with torch.no_grad():
        if name in ("UNet2DConditionModel", "ControlNetModel"):  # the same inputs; the ControlNet's image too
            import diffusers

            m = getattr(diffusers, name).from_pretrained(folder, variant=variant, **kw).eval()
            added = (
                {"text_embeds": T(inputs["text_embeds"]), "time_ids": T(inputs["time_ids"])}
                if "text_embeds" in inputs
                else None
            )
            unet_in = (T(_nchw(inputs["sample"])), T(inputs["timesteps"]).long(), T(inputs["encoder_hidden_states"]))
            if name == "UNet2DConditionModel":
                res = {"sample": _nhwc(m(*unet_in, added_cond_kwargs=added).sample.numpy())}
            else:
                cond = T(_nchw(inputs["controlnet_cond"]))
                down, mid = m(*unet_in, controlnet_cond=cond, added_cond_kwargs=added, return_dict=False)
                res = {f"down_{i}": _nhwc(d.numpy()) for i, d in enumerate(down)} | {"mid": _nhwc(mid.numpy())}
        elif name == "T2IAdapter":
            from diffusers import T2IAdapter

            m = T2IAdapter.from_pretrained(folder, variant=variant, **kw).eval()
            res = {f"feature_{i}": _nhwc(f.numpy()) for i, f in enumerate(m(T(_nchw(inputs["image"]))))}
        elif name == "AutoencoderKL":
            from diffusers import AutoencoderKL

            m = AutoencoderKL.from_pretrained(folder, variant=variant, **kw).eval()
            dist = m.encode(T(_nchw(inputs["images"]))).latent_dist
            res = {
                "mean": _nhwc(dist.mean.numpy()),
                "logvar": _nhwc(dist.logvar.numpy()),
                "decoded": _nhwc(m.decode(dist.mean).sample.numpy()),
            }
        elif name == "ViTModel":
            from transformers import ViTModel

            m = ViTModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False).eval()
            res = {"last_hidden_state": m(T(_nchw(inputs["pixel_values"]))).last_hidden_state.numpy()}
        else:
            import transformers

            m = getattr(transformers, name).from_pretrained(folder, dtype=torch.float32).eval()
            res = {}
            if name == "CLIPModel":
                # transformers v5 returns an output object (projected features in pooler_output), v4 a tensor.
                feats = lambda o: getattr(o, "pooler_output", o).numpy()
                res["text_embeds"] = feats(m.get_text_features(T(inputs["input_ids"]).long()))
                res["image_embeds"] = feats(m.get_image_features(T(_nchw(inputs["pixel_values"]))))
            elif "Text" in name:
                o = m(T(inputs["input_ids"]).long(), output_hidden_states=True)
                res["penultimate"] = o.hidden_states[-2].numpy()
                res["last_hidden_state"] = o.last_hidden_state.numpy()
                res["pooled"] = (o.text_embeds if hasattr(o, "text_embeds") else o.pooler_output).numpy()
            else:
                o = m(T(_nchw(inputs["pixel_values"])), output_hidden_states=True)
                res["last_hidden_state"] = o.last_hidden_state.numpy()
                res["pooled"] = (o.image_embeds if hasattr(o, "image_embeds") else o.pooler_output).numpy()
    del m
    gc.collect()
    return res


def run_flax(name: str, folder: Path, inputs: dict) -> dict:
    import jax
    import jax.numpy as jnp

    with jax.default_matmul_precision("highest"):
        m = modeling.from_pretrained(folder, param_dtype=jnp.float32)
        J = lambda x: jnp.asarray(x)
        if name == "UNet2DConditionModel":
            extra = {k: J(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
            res = {
                "sample": m(J(inputs["sample"]), J(inputs["timesteps"]), J(inputs["encoder_hidden_states"]), **extra)
            }
        elif name == "ControlNetModel":
            extra = {k: J(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
            down, mid = m(
                J(inputs["sample"]),
                J(inputs["timesteps"]),
                J(inputs["encoder_hidden_states"]),
                J(inputs["controlnet_cond"]),
                **extra,
            )
            res = {f"down_{i}": d for i, d in enumerate(down)} | {"mid": mid}
        elif name == "T2IAdapter":
            res = {f"feature_{i}": f for i, f in enumerate(m(J(inputs["image"])))}
        elif name == "AutoencoderKL":
            dist = m.encode(J(inputs["images"]))
            res = {"mean": dist.mean, "logvar": dist.logvar, "decoded": m.decode(dist.mean)}
        elif name == "ViTModel":
            res = {"last_hidden_state": m(J(inputs["pixel_values"])).last_hidden_state}
        elif name == "CLIPModel":
            res = {
                "text_embeds": m.get_text_features(J(inputs["input_ids"])),
                "image_embeds": m.get_image_features(J(inputs["pixel_values"])),
            }
        elif "Text" in name:
            o = m(J(inputs["input_ids"]))
            res = {
                "penultimate": o.hidden_states[-2],
                "last_hidden_state": o.last_hidden_state,
                "pooled": getattr(o, "text_embeds", None) if "Projection" in name else o.pooler_output,
            }
        else:
            o = m(J(inputs["pixel_values"]))
            res = {
                "last_hidden_state": o.last_hidden_state,
                "pooled": getattr(o, "image_embeds", None) if "Projection" in name else o.pooler_output,
            }
        return {k: np.asarray(v) for k, v in res.items()}


def verify_component(src: Path, dst: Path, variant=None, **input_kw) -> dict[str, float]:
    """{output name: max abs difference} between PyTorch (src) and Flax (dst)."""
    cfg = modeling.read_config(dst)
    name = cfg[modeling.CLASS_KEY]
    inputs = reference_inputs(name, cfg, **input_kw)
    ref = run_torch(name, src, inputs, variant=variant)
    ours = run_flax(name, dst, inputs)
    return {k: max_abs_diff(ours[k], ref[k]) for k in ref}


def max_abs_diff(a, b) -> float:
    """max |a - b|, NaN when either side holds a non-finite value (np.max alone would hide a NaN next
    to a matching Inf, and Python's max() drops NaN)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def verify_folder(src, dst, variant=None) -> float:
    """Verifies every converted component under `dst`; prints one line each; returns the worst diff,
    NaN when any output is non-finite (the caller fails on it)."""
    src, dst = Path(src), Path(dst)
    pairs = (
        [(src, dst)]
        if (dst / modeling.CONFIG_FILE).is_file()
        else [(src / c.name, c) for c in sorted(dst.iterdir()) if (c / modeling.CONFIG_FILE).is_file()]
    )
    worst = 0.0
    for s, d in pairs:
        diffs = verify_component(s, d, variant=variant)
        worst = float("nan") if any(np.isnan(v) for v in [worst, *diffs.values()]) else max([worst, *diffs.values()])
        print(f"verify {d.name}: " + ", ".join(f"{k} max|diff|={v:.3g}" for k, v in diffs.items()), flush=True)
    return worst
