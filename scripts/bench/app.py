"""The web app vs the generate CLI on tiny models: start-up time and time per image.

    python scripts/bench/app.py                    # 2 images per request, 50 steps (the defaults)
    python scripts/bench/app.py --steps 20 --requests 10

Same model on both sides: a tiny SDXL + PhotoMaker (the `tiny` size, random weights, converted from
the PyTorch test references into WORK/models; needs the [test] extra). Same request: one reference
photo, "a photo of a man img", NUM_IMAGES seeds, STEPS Euler steps, guidance 5, start_merge_step 10,
the model's 32x32.

- generate CLI: `python -m persongen_jax.generate --model ... --ref ... --seeds 0-(N-1) --out ...`, run
  --cli-runs times; each run is a fresh process that loads the model and compiles the sampler: its wall
  time is what one request costs with the CLI.
- app: `python -m persongen_jax.app --model ... --num-images N --steps S`: start-up = process start to
  the page answering (load + compile of the default request + Gradio); then --requests requests through
  gradio_client (wall time at the client, upload and download included). The first request is timed
  apart: it must not be the slow one (the page reports whether a request compiled; the script checks
  that none did).
- also the app on `--tiny` (the demo training's models, with a bg adapter and its P_bg field): start-up
  and requests, for the README's look at the app.

Ratio = CLI time per image / app time per image (a request's images, with its upload / download).
Peak RSS: the app process (VmHWM), the largest generate child. No persistent compilation cache
(JAX_COMPILATION_CACHE_DIR is removed from the children's environment).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from scripts.bench import common  # noqa: E402

PROMPT = "a photo of a man img"


def build_models(work: Path) -> tuple[Path, Path, Path]:
    import numpy as np
    from PIL import Image

    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl
    from weights_conversion.convert import convert_sdxl
    from weights_conversion.lora import convert_photomaker

    models = work / "models"
    if not (models / "photomaker").is_dir():
        convert_sdxl(make_tiny_sdxl(models / "sdxl_src"), models / "sdxl")
        convert_photomaker(
            make_tiny_photomaker(models / "pm.bin"), models / "photomaker", unet=models / "sdxl" / "unet"
        )
    face = work / "face.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 256, (64, 64, 3)).astype(np.uint8)).save(face)
    return models / "sdxl", models / "photomaker", face


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), GRADIO_ANALYTICS_ENABLED="False")
    return env


def bench_cli(sdxl: Path, pm: Path, face: Path, args, work: Path) -> dict:
    times = []
    for r in range(args.cli_runs):
        out = work / f"cli_{r}"
        cmd = [
            sys.executable,
            "-m",
            "persongen_jax.generate",
            "--model",
            str(sdxl),
            "--photomaker",
            str(pm),
            "--ref",
            str(face),
            "--prompt",
            PROMPT,
            "--seeds",
            f"0-{args.num_images - 1}",
            "--steps",
            str(args.steps),
            "--out",
            str(out),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            raise SystemExit(f"generate failed:\n{proc.stderr[-3000:]}")
        print(f"  generate run {r}: {times[-1]:.2f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    med = statistics.median(times)
    return {
        "runs_s": [round(t, 2) for t in times],
        "median_s": round(med, 2),
        "per_image_s": round(med / args.num_images, 3),
        "peak_rss_mib": round(peak),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_app(model_args: list[str], face: Path, args, work: Path, label: str) -> dict:
    from gradio_client import Client, handle_file

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = work / f"app_{label}.log"
    cmd = [
        sys.executable,
        "-m",
        "persongen_jax.app",
        *model_args,
        "--num-images",
        str(args.num_images),
        "--steps",
        str(args.steps),
        "--port",
        str(port),
    ]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**child_env(), "GRADIO_TEMP_DIR": str(work / "gradio")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the app exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        startup = time.perf_counter() - t0
        print(f"  app {label}: serving after {startup:.1f} s", flush=True)
        client = Client(url, verbose=False, download_files=str(work / "downloads"))
        times, server, statuses = [], [], []
        for r in range(args.requests + 1):
            t = time.perf_counter()
            gallery, status, *_ = client.predict(
                reference_photos=[handle_file(str(face))], prompt=PROMPT, seed=r, api_name="/generate"
            )
            times.append(time.perf_counter() - t)
            statuses.append(status)
            server.append(float(re.search(r": ([0-9.]+) s \(", status).group(1)))  # the app's own timing
            assert len(gallery) == args.num_images, gallery
        compiled = [s for s in statuses if "no compilation" not in s]
        if compiled:
            raise SystemExit(f"app {label}: requests compiled: {compiled}")
        peak = _vm_hwm_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    warm = statistics.median(times[1:])
    return {
        "startup_s": round(startup, 1),
        "first_request_s": round(times[0], 3),
        "median_request_s": round(warm, 3),
        "per_image_s": round(warm / args.num_images, 3),
        "server_first_s": server[0],
        "server_median_s": statistics.median(server[1:]),
        "requests": len(times),
        "peak_rss_mib": round(peak) if peak else None,
        "log_tail": [line for line in log_path.read_text().splitlines() if "compiled" in line or "warm-up" in line],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--cli-runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=5, help="timed requests after the first")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_app_"))
    work.mkdir(parents=True, exist_ok=True)
    sdxl, pm, face = build_models(work)
    print(f"machine: {common.machine()}; {args.num_images} images x {args.steps} steps per request", flush=True)
    cli = bench_cli(sdxl, pm, face, args, work)
    app = bench_app(["--model", str(sdxl), "--photomaker", str(pm)], face, args, work, "model")
    tiny = bench_app(["--tiny"], face, args, work, "tiny")
    ratio = cli["per_image_s"] / app["per_image_s"]
    print(
        f"generate CLI: {cli['median_s']:.2f} s per run of {args.num_images} images (load + compile + sample), "
        f"{cli['per_image_s']:.3f} s per image, peak RSS {cli['peak_rss_mib']} MiB"
    )
    for name, a in (("app --model", app), ("app --tiny ", tiny)):
        print(
            f"{name}: start-up {a['startup_s']:.1f} s; request at the client: first {a['first_request_s']:.3f} s, "
            f"median {a['median_request_s']:.3f} s = {a['per_image_s']:.3f} s per image; in the app: first "
            f"{a['server_first_s']:.2f} s, median {a['server_median_s']:.2f} s; peak RSS {a['peak_rss_mib']} MiB"
        )
    print(f"ratio (CLI / app, time per image): {ratio:.1f}x")
    print(
        json.dumps(
            {
                "machine": common.machine(),
                "steps": args.steps,
                "num_images": args.num_images,
                "generate_cli": cli,
                "app_model": app,
                "app_tiny": tiny,
                "ratio": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
