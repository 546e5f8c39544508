"""The new evaluation metrics' networks, JAX vs their PyTorch references: images per second and peak memory.

    python scripts/bench/paper_metrics.py                              # all four, CPU defaults
    python scripts/bench/paper_metrics.py --which dino fid --batch 8 --steps 3 --warmup 1

Per metric, what its scorer runs per batch on already-preprocessed inputs (host decoding, resizing to the
model's input, face detection excluded), fp32, random weights held identically by both sides:
  clip_i  JAX `clip_t._image_embeddings` (CLIP image features, L2-normalised) vs transformers
          `CLIPModel.get_image_features` + normalise; ViT-B/32 shape (eval.py's `--model base`), 224 px.
  dino    JAX `dino._embed` (ViT CLS after the final LayerNorm, normalised) vs transformers `ViTModel`
          (no pooler) `last_hidden_state[:, 0]` + normalise; ViT-S/16 (facebook/dino-vits16's config), 224 px.
  fid     JAX `fid._prepare` + `fid._trunk` (bilinear resize to 299, InceptionV3 pool features) vs
          pytorch-fid 0.3 `InceptionV3()` (same resize inside); 256 x 256 inputs in [0, 1].
  lpips   JAX `face_div._lpips` vs `lpips.LPIPS(net="alex")`, pairs of 128 x 128 uint8 face regions (Face Div.).
Each framework runs in its own child process (peak RSS per side on a CPU; allocator peak on a GPU); the
models are built and converted once in a preparation child. Prints img/s per side, ratio = reference time /
JAX time (>1: JAX faster), JAX compile time and the max abs difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402

BENCHES = ("clip_i", "dino", "fid", "lpips")


def prepare(args, work: Path) -> dict:
    import numpy as np
    import torch

    from persongen_jax.testing.torch_refs import fid_inception, install_torchvision_shim, lpips_model

    install_torchvision_shim()
    import transformers

    rng = np.random.default_rng(0)
    b = args.batch
    if "clip_i" in args.which:
        from scripts.bench.eval import clip_config
        from weights_conversion.convert import convert_clip

        torch.manual_seed(0)
        transformers.CLIPModel(transformers.CLIPConfig(**clip_config("base"))).eval().save_pretrained(
            work / "clip_i_src"
        )
        convert_clip(work / "clip_i_src", work / "clip_i_jax")
        np.save(work / "clip_i_in.npy", rng.standard_normal((b, 224, 224, 3)).astype(np.float32))
    if "dino" in args.which:
        from persongen_jax.models.vit import DINO_VITS16
        from weights_conversion.convert import convert_clip

        torch.manual_seed(0)
        cfg = {k: v for k, v in DINO_VITS16.items() if k not in ("architectures", "model_type")}
        transformers.ViTModel(transformers.ViTConfig(**cfg), add_pooling_layer=False).eval().save_pretrained(
            work / "dino_src"
        )
        convert_clip(work / "dino_src", work / "dino_jax", supported=("ViTModel",))
        np.save(work / "dino_in.npy", rng.standard_normal((b, 224, 224, 3)).astype(np.float32))
    if "fid" in args.which:
        from weights_conversion.metric_models import convert_inception

        torch.save(fid_inception(0).state_dict(), work / "fid.pth")
        convert_inception(work / "fid.pth", work / "fid_jax")
        np.save(work / "fid_in.npy", rng.random((b, 256, 256, 3)).astype(np.float32))
    if "lpips" in args.which:
        from weights_conversion.metric_models import convert_lpips

        torch.save(lpips_model("alex", 0).state_dict(), work / "lpips.pth")
        convert_lpips(work / "lpips.pth", work / "lpips_jax")
        np.save(work / "lpips_in.npy", rng.integers(0, 256, (2, b, 128, 128, 3)).astype(np.uint8))
    return {}


def run_reference(args, work: Path) -> dict:
    import numpy as np
    import torch

    from persongen_jax.testing.torch_refs import fid_inception, install_torchvision_shim, lpips_model

    install_torchvision_shim()
    import transformers

    torch.set_grad_enabled(False)
    x = np.load(work / f"{args.bench}_in.npy")
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    norm = torch.nn.functional.normalize
    if args.bench == "clip_i":
        m = transformers.CLIPModel.from_pretrained(work / "clip_i_src").eval()
        inp = nchw(x)
        fn = lambda: norm(getattr(f := m.get_image_features(pixel_values=inp), "pooler_output", f), dim=-1)  # noqa
    elif args.bench == "dino":
        m = transformers.ViTModel.from_pretrained(work / "dino_src", add_pooling_layer=False).eval()
        inp = nchw(x)
        fn = lambda: norm(m(inp).last_hidden_state[:, 0], dim=-1)  # noqa: E731
    elif args.bench == "fid":
        m = fid_inception(1)
        m.load_state_dict(torch.load(work / "fid.pth"))
        inp = nchw(x)
        fn = lambda: m(inp)[0].reshape(len(x), -1)  # noqa: E731
    else:
        m = lpips_model("alex", 1)
        m.load_state_dict(torch.load(work / "lpips.pth"))
        a = torch.from_numpy(x[0].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
        b = torch.from_numpy(x[1].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
        fn = lambda: m(a, b).reshape(-1)  # noqa: E731
    med, times, peak = common.time_torch(fn, args.steps, args.warmup, "cpu")
    np.save(work / f"{args.bench}_ref.npy", fn().numpy())
    return {"framework": "torch", "median_s": med, "images_per_s": args.batch / med, "peak_mib": peak}


def run_jax(args, work: Path) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from persongen_jax.models import modeling

    x = np.load(work / f"{args.bench}_in.npy")
    model = modeling.from_pretrained(work / f"{args.bench}_jax")
    if args.bench == "clip_i":
        from persongen_jax.evaluation.clip_t import _image_embeddings as f

        call_args = (model, jnp.asarray(x))
    elif args.bench == "dino":
        from persongen_jax.evaluation.dino import _embed as f

        call_args = (model, jnp.asarray(x))
    elif args.bench == "fid":
        from persongen_jax.evaluation.fid import _prepare, _trunk

        f = lambda m, a: _trunk(m, _prepare(m, a))  # noqa: E731  (FIDScorer's two calls)
        call_args = (model, jnp.asarray(x))
    else:
        from persongen_jax.evaluation.face_div import _lpips as f

        call_args = (model, jnp.asarray(x[0]), jnp.asarray(x[1]))
    t0 = time.perf_counter()
    f(*call_args).block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        f(*call_args).block_until_ready()
    med, times = common.median_time(lambda: f(*call_args), args.steps, lambda o: o.block_until_ready())
    np.save(work / f"{args.bench}_jax.npy", np.asarray(f(*call_args)))
    return {
        "framework": "jax",
        "median_s": med,
        "images_per_s": args.batch / med,
        "compile_s": compile_s,
        "peak_mib": common.peak_rss_mib(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", nargs="+", choices=BENCHES, default=list(BENCHES))
    p.add_argument("--batch", type=int, default=8, help="images (LPIPS: pairs) per call")
    p.add_argument("--steps", type=int, default=3, help="timed calls (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stage", choices=["prepare", "reference", "jax"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--bench", choices=BENCHES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        fn = {"prepare": prepare, "reference": run_reference, "jax": run_jax}[args.stage]
        print(json.dumps(fn(args, args.workdir)))
        return
    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="bench-paper-metrics-"))
    argv = common.child_argv(__file__, args, "batch", "steps", "warmup", "which") + ["--workdir", str(work)]
    try:
        print(f"machine: {common.machine()}; batch {args.batch}, median of {args.steps} (warm-up {args.warmup})")
        common.run_child(argv + ["--stage", "prepare"])
        out = {}
        for bench in args.which:
            ref = common.run_child(argv + ["--stage", "reference", "--bench", bench])
            jx = common.run_child(argv + ["--stage", "jax", "--bench", bench])
            diff = float(np.max(np.abs(np.load(work / f"{bench}_jax.npy") - np.load(work / f"{bench}_ref.npy"))))
            ratio = ref["median_s"] / jx["median_s"]
            print(
                f"{bench:7s} reference {ref['images_per_s']:7.1f} img/s (peak {ref['peak_mib']:5.0f} MiB) | "
                f"jax {jx['images_per_s']:7.1f} img/s (peak {jx['peak_mib']:5.0f} MiB, compile "
                f"{jx['compile_s']:.1f} s) | ratio ref/jax {ratio:.2f}x | max abs diff {diff:.2e}",
                flush=True,
            )
            out[bench] = {"reference": ref, "jax": jx, "ratio": ratio, "max_abs_diff": diff}
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
