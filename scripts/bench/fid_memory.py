"""Streaming FID memory: peak RSS of `FIDScorer.statistics` on N small images, N = 2,000 and 20,000.

    python scripts/bench/fid_memory.py                       # 2,000 and 20,000 images of 75 x 75, batch 50
    python scripts/bench/fid_memory.py --counts 200 2000 --size 75 --batch 50

What FID's streaming must show: memory is one batch + the 2048 x 2048 running statistics, whatever the
number of images (pytorch-fid keeps all N x 2048 activations: 156 MiB at N = 20,000 in float32, 1.5 GiB at
N = 200,000). Each N runs in its own child process: random FIDInceptionV3 weights (`modeling.random_init`,
no file), images drawn one at a time by a generator (the source holds nothing), `resize_input` off so the
network runs at the images' own size (75 x 75, InceptionV3's smallest input; the in-network resize to 299
would make 20,000 images take hours on a CPU: it changes the per-batch compute, not what is kept). The
child prints its peak RSS (ru_maxrss), the time and the number of images in the statistics; the parent
prints the ratio of the largest N's peak to the smallest's (acceptance: <= 1.3x).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402


def child(n: int, size: int, batch: int) -> dict:
    import numpy as np

    from persongen_jax.evaluation.fid import FIDScorer
    from persongen_jax.models import modeling
    from persongen_jax.models.inception import FIDInceptionV3

    config = {"resize_input": False, "normalize_input": True}
    model = modeling.random_init(FIDInceptionV3, config, 0)
    flat = {p: (abs(v) + 0.5 if str(p[-1]) == "running_var" else v) for p, v in modeling.flat_params(model).items()}
    scorer = FIDScorer(modeling.assign_params(model, flat), batch_size=batch)
    rng = np.random.default_rng(0)

    def images():
        for _ in range(n):
            yield rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    t0 = time.perf_counter()
    stats = scorer.statistics(images())
    mu, sigma = stats.mean_cov()
    seconds = time.perf_counter() - t0
    return {
        "n": stats.n,
        "seconds": seconds,
        "img_s": n / seconds,
        "peak_rss_mib": common.peak_rss_mib(),
        "finite": bool(np.isfinite(mu).all() and np.isfinite(sigma).all()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--size", type=int, default=75)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.size, args.batch)))
        return
    print(f"machine: {common.machine()}")
    results = []
    for n in args.counts:
        r = common.run_child([__file__, "--child", str(n), "--size", str(args.size), "--batch", str(args.batch)])
        results.append(r)
        print(
            f"N={r['n']:>6}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s ({r['img_s']:.1f} img/s), "
            f"statistics finite: {r['finite']}",
            flush=True,
        )
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    print(f"peak RSS ratio N={results[-1]['n']} / N={results[0]['n']}: {ratio:.3f}x (acceptance <= 1.3x)")
    print(json.dumps({"results": results, "ratio": ratio}))


if __name__ == "__main__":
    main()
