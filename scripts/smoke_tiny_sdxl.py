"""The embedded default job: tiny random SDXL -> conversion CLI (--verify) -> JAX forward + decode.

    python scripts/smoke_tiny_sdxl.py --out runs/smoke

Runs offline on a CPU in about a minute. Steps:
  1. build a tiny random SDXL pipeline folder in diffusers layout (PyTorch);
  2. convert it with `python -m weights_conversion sdxl ... --verify` (prints PyTorch-vs-JAX diffs);
  3. load the converted components, tokenize a prompt with the copied tokenizers, encode it
     the SDXL way (penultimate hidden states of both encoders, pooled embeds of encoder 2),
     predict the noise of a pure-noise latent at t=999, take the x0 estimate, decode it with the VAE;
  4. write OUT/sample.png and OUT/summary.json.
(The full sampler and the PhotoMaker method arrive with the generate CLI.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/smoke"))
    p.add_argument("--prompt", default="a photo of a person in a red hat")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl

    src = make_tiny_sdxl(args.out / "tiny_sdxl_pytorch", seed=args.seed)
    dst = args.out / "tiny_sdxl_jax"
    print(f"[1/3] tiny PyTorch SDXL written to {src}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "weights_conversion", "sdxl", str(src), str(dst), "--verify", "--overwrite"],
        cwd=REPO,
        text=True,
        capture_output=True,
    )
    if proc.returncode:
        raise SystemExit(f"conversion failed:\n{proc.stdout}\n{proc.stderr}")
    print("[2/3] " + proc.stdout.strip().replace("\n", "\n      "), flush=True)

    import jax
    import jax.numpy as jnp
    from PIL import Image
    from transformers import CLIPTokenizer

    from persongen_jax.models import from_pretrained

    unet, vae = from_pretrained(dst / "unet"), from_pretrained(dst / "vae")
    te1, te2 = from_pretrained(dst / "text_encoder"), from_pretrained(dst / "text_encoder_2")
    ids = [
        CLIPTokenizer.from_pretrained(dst / t)(
            args.prompt, padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids
        for t in ("tokenizer", "tokenizer_2")
    ]
    o1, o2 = te1(jnp.asarray(ids[0])), te2(jnp.asarray(ids[1]))
    context = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)  # [1, 77, 2*hidden]
    pooled = o2.text_embeds
    size = 64
    time_ids = jnp.array([[size, size, 0, 0, size, size]], jnp.float32)
    latent_hw = size // vae.downscale_factor
    noise = jax.random.normal(jax.random.key(args.seed), (1, latent_hw, latent_hw, 4))
    # SDXL scaled_linear schedule: alpha_bar at t=999.
    betas = jnp.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = jnp.cumprod(1 - betas)[999]
    eps = jax.jit(lambda x: unet(x, jnp.array([999]), context, text_embeds=pooled, time_ids=time_ids))(noise)
    x0 = (noise - jnp.sqrt(1 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    image = jax.jit(lambda z: vae.decode(z / vae.scaling_factor))(x0 * vae.scaling_factor)
    pixels = np.asarray(jnp.clip((image[0] + 1) * 127.5, 0, 255)).astype(np.uint8)
    Image.fromarray(pixels).save(args.out / "sample.png")
    summary = {
        "prompt": args.prompt,
        "image": "sample.png",
        "image_shape": list(pixels.shape),
        "verify": [ln for ln in proc.stdout.splitlines() if ln.startswith("verify ")],
        "finite": bool(np.isfinite(np.asarray(image)).all()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[3/3] wrote {args.out / 'sample.png'} {tuple(pixels.shape)} and summary.json in {summary['seconds']} s",
        flush=True,
    )
    if not summary["finite"]:
        raise SystemExit("non-finite output")


if __name__ == "__main__":
    main()
