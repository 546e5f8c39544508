"""The device suite's --tiny mode (the code a lent GPU runs, on CI-sized shapes) runs and prints
its table. The method part (the suite's own train-loop measurement) and one comparison part (sampling, JAX
vs diffusers) run; unet, the batch-4 sampling and eval are left out to keep CI time down (the same
child-process path with other scripts; `device_suite.py --tiny` runs all five)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[1]


def test_device_suite_tiny_prints_the_table(tmp_path):
    env = cli_env()
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench/device_suite.py",
            "--tiny",
            "--out",
            str(tmp_path),
            "--parts",
            "method,sample_1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device suite (tiny)")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(rows) >= {"method train step", "sample_1"}, rows
    assert "failed" not in proc.stdout, proc.stdout
    assert "img/s" in rows["method train step"] and "x |" in rows["sample_1"]
    saved = json.loads((tmp_path / "device_suite.json").read_text())
    assert saved["sample_1"]["pytorch"]["median_s"] > 0
    # The method part times each step from outside the loop (after jax.block_until_ready on its outputs):
    # its img/s is batch / median step time, and the steps fit in the part's wall time.
    method = saved["method"]
    assert len(method["times"]) == 2 and method["img_per_s"] == 2 / method["median_s"]
    assert 0 < sum(method["times"]) < method["wall_s"] - method["compile_s"]
    assert (tmp_path / "device_suite.md").read_text().startswith("device suite (tiny)")
