"""PhotoMaker V2 ID encoder forward, JAX vs the PyTorch reference, same run.

    python scripts/bench/id_encoder_v2.py                      # published size, batch of 4 references
    python scripts/bench/id_encoder_v2.py --size tiny --steps 20

What is timed: one `encoder(id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds)` call -- the CLIP
ViT-L/14 tower on the 4 reference crops (all tokens), the QFormerPerceiver (token_proj + FacePerceiverResampler,
depth 4, 16 heads of 128) and the fuse module on 8 class tokens of a 77 x 2048 prompt. JAX: our
`PhotoMakerV2IDEncoder` under `nnx.jit(graph_updates=False)`, timed after `jax.block_until_ready`. Reference:
the published modules (`photomaker/model_v2.py` + IP-Adapter's resampler, as written in
tests/test_id_encoder_v2.py), PyTorch eager fp32, `torch.no_grad()`. Both hold the same random weights
(`testing.tiny_photomaker.id_encoder_v2_state_dict`, seeded, regenerated in each child) and take the same
inputs. Each framework runs in its own child process (peak RSS per framework); prints the median time per
call, ratio = reference / JAX (> 1: JAX faster), peak memory, JAX compile time and the max abs difference
of the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts.bench import common  # noqa: E402

PRESETS = {"published": "photomaker_v2", "tiny": "tiny"}


def _inputs(cfg: dict, batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    size, d = cfg["vision_config"]["image_size"], cfg["cross_attention_dim"]
    pixels = rng.standard_normal((1, batch, 3, size, size)).astype(np.float32)
    prompt = rng.standard_normal((1, 77, d)).astype(np.float32)
    mask = np.zeros((1, 77), bool)
    mask[0, 5 : 5 + batch * cfg["num_tokens"]] = True
    ids = (4 * rng.standard_normal((1, batch, cfg["id_embeddings_dim"]))).astype(np.float32)
    return pixels, prompt, mask, ids


def child(args) -> dict:
    import numpy as np

    from persongen_jax.models.id_encoder_v2 import PhotoMakerV2IDEncoder
    from persongen_jax.testing.tiny_photomaker import id_encoder_v2_state_dict

    preset = PRESETS[args.size]
    cfg = PhotoMakerV2IDEncoder.preset_config(preset)
    sd = id_encoder_v2_state_dict(seed=0, preset=preset)
    pixels, prompt, mask, ids = _inputs(cfg, args.batch)
    out: dict = {"framework": args.child}
    if args.child == "torch":
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from test_id_encoder_v2 import TorchPhotoMakerV2IDEncoder

        ref = TorchPhotoMakerV2IDEncoder(cfg).eval()
        ref.load_state_dict(sd, strict=True)
        del sd
        t = [torch.from_numpy(x) for x in (pixels, prompt, mask, ids)]
        with torch.no_grad():
            med, times, peak = common.time_torch(
                lambda: ref(t[0], t[1].clone(), t[2], t[3]), args.steps, args.warmup, "cpu"
            )
            result = ref(t[0], t[1].clone(), t[2], t[3]).numpy()
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from weights_conversion import core

        model = core.load_from_torch_state_dict(PhotoMakerV2IDEncoder, PhotoMakerV2IDEncoder.preset_config(preset), sd)
        del sd
        fwd = nnx.jit(lambda m, p, e, c, i: m(p, e, c, i), graph_updates=False)
        x = (jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)), jnp.asarray(prompt), jnp.asarray(mask), jnp.asarray(ids))
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(model, *x))
        out["compile_s"] = time.perf_counter() - t0
        for _ in range(max(args.warmup - 1, 0)):
            jax.block_until_ready(fwd(model, *x))
        med, times = common.median_time(lambda: fwd(model, *x), args.steps, jax.block_until_ready)
        peak = common.peak_rss_mib()
        result = np.asarray(fwd(model, *x))
    np.save(Path(args.out) / f"{args.child}.npy", result)
    out.update(median_s=med, times=times, peak_mib=peak)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(PRESETS), default="published", help="encoder size (default published)")
    p.add_argument("--batch", type=int, default=4, help="reference images per call (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed calls (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--child", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        base = common.child_argv(__file__, args, "size", "batch", "steps", "warmup") + ["--out", tmp]
        res = {fw: common.run_child(base + ["--child", fw]) for fw in ("torch", "jax")}
        diff = float(np.abs(np.load(Path(tmp) / "jax.npy") - np.load(Path(tmp) / "torch.npy")).max())
    t, j = res["torch"], res["jax"]
    print(f"machine: {common.machine()}")
    print(f"PhotoMaker V2 encoder ({args.size}), batch {args.batch} references, fp32")
    print(f"  PyTorch eager: {t['median_s'] * 1e3:.1f} ms/call (peak RSS {t['peak_mib']:.0f} MiB)")
    print(
        f"  JAX (jit):     {j['median_s'] * 1e3:.1f} ms/call (peak RSS {j['peak_mib']:.0f} MiB, compile "
        f"{j['compile_s']:.1f} s)"
    )
    print(f"  ratio (PyTorch / JAX): {t['median_s'] / j['median_s']:.2f}x; max abs diff of the outputs {diff:.2e}")
    print(json.dumps({"torch": t, "jax": j, "max_abs_diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
