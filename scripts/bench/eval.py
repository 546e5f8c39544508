"""Evaluation models, JAX vs the reference path: CLIP-T scoring and ArcFace embedding throughput.

    python scripts/bench/eval.py                                   # CPU defaults: CLIP ViT-B/32 shape + ArcFace r50
    python scripts/bench/eval.py --which both --model base --arcface r50 --batch 16 --steps 5 --warmup 2
    python scripts/bench/eval.py --model large --arcface r100 --batch 64 --steps 20   # on a GPU

CLIP-T: what `CLIPTScorer` runs per batch -- image features + text features + 100 * cosine.
JAX: `persongen_jax.evaluation.clip_t._scores` (nnx.jit, graph_updates=False) on our `CLIPModel`. Reference:
transformers `CLIPModel.get_image_features` + `get_text_features` + cosine, PyTorch eager fp32,
`torch.no_grad()`. `--model large` is the openai/clip-vit-large-patch14 shape, `--model base` the
ViT-B/32 shape. Random weights (seeded transformers init), saved by transformers and converted by
`weights_conversion.convert.convert_clip`, so both sides hold identical weights. Inputs are already
preprocessed: random CLIP-normalised pixels and random token ids (BOS, words, EOT 49407 then EOT
padding, as OpenAI's tokenizer pads); the config keeps OpenAI's eos_token_id=2, i.e. pooling at the
argmax id (the first EOT) on both sides. Host preprocessing (resize/crop, tokenizer) is excluded.

ArcFace: JAX: `persongen_jax.evaluation.face_sim._embed` (nnx.jit of `iresnet.embed`: normalise
(x - 127.5) / 127.5, IResNet, L2-normalise) on uint8 aligned crops. Reference: onnxruntime
`InferenceSession` (CUDA provider when available, else CPU) on the same ONNX file, fed the NCHW float
blob (x - 127.5) / 127.5 as insightface's ArcFaceONNX does (normalisation and L2 norm timed with it).
The ONNX file is `persongen_jax.testing.tiny_eval.make_arcface_onnx` (random weights, BN folded,
insightface layout), converted by `weights_conversion.onnx_arcface.convert_arcface`.

Each framework runs in its own child process (peak memory per framework: process RSS on CPU, the
allocator peak on a GPU for torch/JAX); the models are built once in a preparation child. Prints
images/s per side, ratio = reference time / JAX time (>1: JAX faster), JAX compile time, XLA's FLOPs
per image, achieved TFLOP/s (MFU on known GPUs) and the max abs difference of the outputs
(parity tolerance 1e-3 in float32). XLA's output size (output_mib) is the result only: the scorers'
functions are `nnx.jit(graph_updates=False)`, so no copy of the parameters comes back per call.
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

CLIP_SHAPES = ("base", "large")


def clip_config(shape: str) -> dict:
    """transformers CLIPConfig kwargs of a CLIP shape: "large" is openai/clip-vit-large-patch14's config
    (persongen_jax's preset; eos_token_id=2 as in OpenAI's released configs: argmax pooling), "base" the
    same with openai/clip-vit-base-patch32's sizes."""
    from persongen_jax.models.clip import CLIPModel

    c = CLIPModel.preset_config("clip_vit_large_patch14")
    if shape == "base":
        c["text_config"].update(hidden_size=512, intermediate_size=2048, num_attention_heads=8, projection_dim=512)
        c["vision_config"].update(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
        )
        c["vision_config"]["projection_dim"] = c["projection_dim"] = 512
    return c


BOS, EOT = 49406, 49407
PARITY_TOL = 1e-3


def arcface_shapes():
    from persongen_jax.testing.tiny_eval import R50, TINY_ARCFACE

    return {"tiny": TINY_ARCFACE, "r50": R50, "r100": dict(R50, layers=[3, 13, 30, 3])}


# ----------------------------------------------------------------------------- preparation (own child)


def prepare(args, work: Path) -> dict:
    """Builds the models and the inputs under `work`; returns facts for the report."""
    import numpy as np

    rng = np.random.default_rng(0)
    facts = {}
    if args.which in ("clip", "both"):
        import torch
        import transformers

        from weights_conversion.convert import convert_clip

        spec = clip_config(args.model)
        torch.manual_seed(0)
        model = transformers.CLIPModel(transformers.CLIPConfig(**spec)).eval()
        model.save_pretrained(work / "clip_src")
        facts["clip_params"] = sum(p.numel() for p in model.parameters())
        del model
        convert_clip(work / "clip_src", work / "clip_jax")
        b, size = args.batch, spec["vision_config"]["image_size"]
        ids = rng.integers(0, BOS, (b, 77)).astype(np.int32)
        ids[:, 0] = BOS
        for i, n in enumerate(rng.integers(4, 60, b)):  # EOT after n tokens, EOT padding after it
            ids[i, n:] = EOT
        np.savez(
            work / "clip_inputs.npz",
            pixel_values=rng.standard_normal((b, size, size, 3)).astype(np.float32),
            input_ids=ids,
        )
    if args.which in ("arcface", "both"):
        import onnx

        from persongen_jax.testing.tiny_eval import make_arcface_onnx
        from weights_conversion.onnx_arcface import convert_arcface

        shape = arcface_shapes()[args.arcface]
        make_arcface_onnx(work / "arcface.onnx", **shape)
        convert_arcface(work / "arcface.onnx", work / "arcface_jax")
        facts["arcface_params"] = int(
            sum(np.prod(t.dims) for t in onnx.load(str(work / "arcface.onnx")).graph.initializer)
        )
        s = shape["input_size"]
        np.savez(work / "arcface_inputs.npz", crops=rng.integers(0, 256, (args.batch, s, s, 3)).astype(np.uint8))
    return facts


# ----------------------------------------------------------------------------- reference children


def run_reference(args, work: Path) -> dict:
    import numpy as np

    if args.bench == "clip":
        import torch
        import transformers

        dev = common.torch_device()
        model = transformers.CLIPModel.from_pretrained(work / "clip_src", dtype=torch.float32).to(dev).eval()
        inp = np.load(work / "clip_inputs.npz")
        pix = torch.from_numpy(inp["pixel_values"]).permute(0, 3, 1, 2).contiguous().to(dev)  # NCHW
        ids = torch.from_numpy(inp["input_ids"]).long().to(dev)

        def feats(out):  # transformers v5 returns BaseModelOutputWithPooling (pooler_output = projected)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def call():
            with torch.no_grad():
                image = feats(model.get_image_features(pixel_values=pix))
                text = feats(model.get_text_features(input_ids=ids))
                image = image / image.norm(dim=-1, keepdim=True)
                text = text / text.norm(dim=-1, keepdim=True)
                return 100.0 * (image * text).sum(-1)

        med, times, peak = common.time_torch(call, args.steps, args.warmup, dev)
        out = call().float().cpu().numpy()
        info = {
            "framework": "pytorch",
            "impl": f"transformers {transformers.__version__} "
            f"({model.config._attn_implementation} attention), torch {torch.__version__}",
            "device": dev,
        }
    else:
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        sess = ort.InferenceSession(str(work / "arcface.onnx"), providers=providers)
        name = sess.get_inputs()[0].name
        crops = np.load(work / "arcface_inputs.npz")["crops"]

        def call():
            blob = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
            e = sess.run(None, {name: np.ascontiguousarray(blob)})[0]
            return e / np.linalg.norm(e, axis=-1, keepdims=True)

        for _ in range(args.warmup):
            call()
        med, times = common.median_time(call, args.steps, lambda _: None)
        peak = common.peak_rss_mib()
        out = call()
        info = {"framework": "onnxruntime", "impl": f"onnxruntime {ort.__version__}", "device": sess.get_providers()[0]}
    np.save(work / f"{args.bench}_reference.npy", np.asarray(out, np.float32))
    return {**info, "median_s": med, "times": times, "peak_mib": peak, "images_per_s": args.batch / med}


# ----------------------------------------------------------------------------- JAX child


def run_jax(args, work: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persongen_jax.models import modeling

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else None
    if args.bench == "clip":
        from persongen_jax.evaluation.clip_t import _scores as fn

        model = modeling.from_pretrained(work / "clip_jax", dtype=dt, param_dtype=dt)
        inp = np.load(work / "clip_inputs.npz")
        call_args = (model, jnp.asarray(inp["pixel_values"]), jnp.asarray(inp["input_ids"]))
    else:
        from persongen_jax.evaluation.face_sim import _embed as fn

        model = modeling.from_pretrained(work / "arcface_jax", dtype=dt, param_dtype=dt)
        call_args = (model, jnp.asarray(np.load(work / "arcface_inputs.npz")["crops"]))
    t0 = time.perf_counter()
    compiled = fn.lower(*call_args).compile()  # the call below reuses this executable
    compile_s = time.perf_counter() - t0
    call = lambda: fn(*call_args)  # the nnx.jit function itself, as the scorers call it
    sync = lambda x: x.block_until_ready()
    for _ in range(max(args.warmup, 1)):
        sync(call())
    med, times = common.median_time(call, args.steps, sync)
    np.save(work / f"{args.bench}_jax.npy", np.asarray(call(), np.float32))
    flops = common.xla_flops(compiled)
    stats = common.jax_device_stats(med, flops, args.dtype)
    return {
        "framework": "jax",
        "impl": f"jax {jax.__version__}",
        "device": jax.devices()[0].device_kind,
        "median_s": med,
        "times": times,
        "images_per_s": args.batch / med,
        "compile_s": compile_s,
        "flops_per_image": flops / args.batch if flops else None,
        **common.xla_memory_mib(compiled),
        **stats,
    }


# ----------------------------------------------------------------------------- driver


def report(bench: str, args, facts: dict, ref: dict, jx: dict, diff: float) -> dict:
    if bench == "clip":
        title = (
            f"CLIP-T (image + text features + cosine), {args.model} shape "
            f"({facts['clip_params'] / 1e6:.1f}M params), batch {args.batch}, 224x224 + 77 tokens"
        )
        ref_name = "transformers (eager)"
    else:
        title = (
            f"ArcFace embedding, {args.arcface} ({facts['arcface_params'] / 1e6:.1f}M params), "
            f"batch {args.batch}, 112x112 crops"
        )
        ref_name = "onnxruntime"
    ratio = ref["median_s"] / jx["median_s"]
    print(f"{title}, JAX {args.dtype}, median of {args.steps} (warm-up {args.warmup})")
    side = lambda name, r: (
        f"  {name:22s}: {r['images_per_s']:8.1f} img/s ({r['median_s'] * 1e3:8.1f} ms)   "
        f"peak {r['peak_mib']:7.0f} MiB   "
    )
    print(side(ref_name, ref) + f"[{ref['device']}]")
    print(side("jax (nnx.jit)", jx) + f"compile {jx['compile_s']:.1f} s")
    print(f"  ratio reference/jax = {ratio:.2f}x  (>1: JAX faster)")
    if jx.get("flops_per_image"):
        print(common.flops_line(f"  XLA GFLOP/image {jx['flops_per_image'] / 1e9:.2f}", jx))
    ok = diff <= PARITY_TOL
    print(
        f"  parity: max abs diff {diff:.2e} ({'scores, 100*cos' if bench == 'clip' else 'unit embeddings'}) "
        f"{'OK' if ok else 'ABOVE'} tol {PARITY_TOL:g}" + ("" if args.dtype == "float32" else " (bf16: info only)")
    )
    return {
        "reference": ref,
        "jax": jx,
        "ratio_ref_over_jax": ratio,
        "max_abs_diff": diff,
        "parity_ok": bool(ok),
        **{k: v for k, v in facts.items() if k.startswith(bench)},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["clip", "arcface", "both"], default="both")
    p.add_argument(
        "--model", choices=CLIP_SHAPES, default=None, help="CLIP shape (default: large on a GPU, base on CPU)"
    )
    p.add_argument("--arcface", choices=["tiny", "r50", "r100"], default="r50")
    p.add_argument("--batch", type=int, default=16, help="images per call (both benchmarks)")
    p.add_argument("--steps", type=int, default=5, help="timed calls (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="JAX side only")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="keep models/inputs here (default: a temp dir)")
    # internal: the child processes
    p.add_argument("--stage", choices=["prepare", "reference", "jax"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--bench", choices=["clip", "arcface"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        fn = {"prepare": prepare, "reference": run_reference, "jax": run_jax}[args.stage]
        print(json.dumps(fn(args, args.workdir)))
        return
    if args.model is None:
        args.model = "large" if shutil.which("nvidia-smi") else "base"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    base = common.child_argv(__file__, args, "which", "model", "arcface", "batch", "steps", "warmup", "dtype")
    base += ["--workdir", str(work)]
    try:
        t0 = time.perf_counter()
        facts = common.run_child(base + ["--stage", "prepare"])
        print(f"machine: {common.machine()}; models built and converted in {time.perf_counter() - t0:.0f} s")
        result = {
            "machine": common.machine(),
            "args": {k: str(v) for k, v in vars(args).items() if k not in ("stage", "bench", "workdir", "out")},
        }
        import numpy as np

        for bench in ["clip", "arcface"] if args.which == "both" else [args.which]:
            ref = common.run_child(base + ["--stage", "reference", "--bench", bench])
            jx = common.run_child(base + ["--stage", "jax", "--bench", bench])
            diff = float(np.max(np.abs(np.load(work / f"{bench}_reference.npy") - np.load(work / f"{bench}_jax.npy"))))
            result[bench] = report(bench, args, facts, ref, jx, diff)
        print("json:", json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
