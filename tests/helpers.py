"""Shared test utilities: randomised PyTorch references, conversion and training through the CLIs, checks of
their outputs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from persongen_jax.testing.torch_init import allow_torchvision_import, randomize_  # noqa: F401  (helpers.X)

REPO = Path(__file__).resolve().parents[1]

# The parity tests' UNet: SDXL-shaped, same block layout (plain block first,
# then two cross-attention levels), text_time added conditions, several transformer layers per block.
# text_embeds are 32-d, so projection_class_embeddings_input_dim = 32 + 6 * 8.
PARITY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 2, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 2, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def parity_unet_config() -> dict:
    """A fresh copy of PARITY_UNET (three levels, more transformer layers than the `tiny` model size)."""
    return copy.deepcopy(PARITY_UNET)


def parity_unet(seed: int):
    """A diffusers UNet2DConditionModel of PARITY_UNET in eval mode, randomised (`randomize_`, SEED), after
    `torch_precise()`."""
    import diffusers

    torch_precise()
    model = diffusers.UNet2DConditionModel(**{k: v for k, v in PARITY_UNET.items() if not k.startswith("_")}).eval()
    randomize_(model, seed=seed)
    return model


def parity_unet_inputs(rng: np.random.Generator, size: int, timesteps, time_ids) -> dict:
    """Random inputs of a PARITY_UNET, B = len(timesteps): sample [B, 4, SIZE, SIZE] (NCHW), ehs [B, 7, 32],
    text_embeds [B, 32] (standard normal, drawn from RNG in this order) and the given timesteps / time_ids."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    b = len(timesteps)
    sample, ehs, text_embeds = f(b, 4, size, size), f(b, 7, 32), f(b, 32)
    time_ids = np.asarray(time_ids, np.float32)
    return dict(sample=sample, timesteps=np.asarray(timesteps), ehs=ehs, text_embeds=text_embeds, time_ids=time_ids)


def torch_precise() -> None:
    """fp32 PyTorch without TF32 shortcuts, deterministic."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def run_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m weights_conversion ARGS` in a subprocess (the real CLI)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "weights_conversion", *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"weights_conversion {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli_env(devices: int = 1, **extra: str) -> dict:
    """A CLI subprocess's environment: this process's, on the CPU with `devices` host devices, plus `extra`.
    The other XLA flags (conftest's compile settings) are kept."""
    count = "--xla_force_host_platform_device_count="
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([f"{count}{devices}", *kept]), **extra)


def train_cmd(config, workdir, *overrides: str) -> list[str]:
    """`python -m persongen_jax.train --config CONFIG --workdir WORKDIR OVERRIDES` as an argument list."""
    return [sys.executable, "-m", "persongen_jax.train", "--config", str(config), "--workdir", str(workdir), *overrides]


def run_train(config, workdir, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `train_cmd` from the repository root on one CPU device (`cli_env()`), output captured."""
    return subprocess.run(
        train_cmd(config, workdir, *overrides), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def converted_tiny_sdxl(root: Path) -> tuple[Path, Path]:
    """`make_tiny_sdxl` into ROOT/src, converted by the CLI (`weights_conversion sdxl`) into ROOT/sdxl -> both."""
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl

    src = make_tiny_sdxl(root / "src")
    run_cli("sdxl", src, root / "sdxl")
    return src, root / "sdxl"


# `generate` from a training run's checkpoint, as the run tests call it: two quick images (2 steps, seeds 0 and 1)
# of a prompt with the trigger word.
GENERATE_TWO_SEEDS = ("--prompt", "a photo of a man img", "--steps", "2", "--seeds", "0,1")


def assert_two_different_images(out: Path, size: int = 32) -> None:
    """OUT holds seed_0.png and seed_1.png (GENERATE_TWO_SEEDS): SIZE x SIZE RGB, and not the same image."""
    from PIL import Image

    images = [np.asarray(Image.open(Path(out) / f"seed_{s}.png")) for s in (0, 1)]
    assert images[0].shape == (size, size, 3) and not np.array_equal(images[0], images[1])


def convert_and_load(kind: str, src: Path, dst: Path, component: str | None = None):
    """Converts the folder `src` with `python -m weights_conversion KIND src dst` and loads
    `dst[/component]` with `persongen_jax.models.from_pretrained`."""
    from persongen_jax.models import from_pretrained

    run_cli(kind, src, dst)
    return from_pretrained(dst / component if component else dst)


def assert_close(actual, expected, rtol: float = 1e-4, atol: float = 1e-4, name: str = "") -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def add_damaged_record(data_dir: Path, person_id: str, image: str) -> int:
    """Appends to a dataset a record that passes the writer's checks but whose image bytes do not decode (a
    damaged shard): a shard of its own, listed in index.json with its checksum. -> its global record index."""
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    from persongen_jax.data import format as fmt

    index = fmt.load_index(data_dir)
    header = dict(
        person_id=person_id,
        image=image,
        caption="a photo of a man img",
        caption_bg=None,
        caption_body=None,
        face_box=[0, 0, 8, 8],
        width=32,
        height=32,
        format="JPEG",
    )
    w = ArrayRecordWriter(str(Path(data_dir) / "extra.array_record"), "group_size:1")
    w.write(fmt.encode_record(header, b"\xff\xd8 truncated"))
    w.close()
    index["shards"] += fmt.index_shards(data_dir, ["extra.array_record"])
    index["persons"][person_id].append(index["num_records"])
    index["num_records"] += 1
    (Path(data_dir) / "index.json").write_text(json.dumps(index))
    return index["num_records"] - 1


def assert_loss_falls(losses, k: int = 10, z: float = 3.0) -> None:
    """The training tests' rule: the mean of the last k losses is below the mean of the first k by more than
    z standard errors of that difference (sqrt(var_first / k + var_last / k), sample variances), so a loss
    that only wanders (diffusion losses are noisy: random timesteps) does not pass."""
    losses = np.asarray(losses, np.float64)
    first, last = losses[:k], losses[-k:]
    se = float(np.sqrt(first.var(ddof=1) / k + last.var(ddof=1) / k))
    drop = float(first.mean() - last.mean())
    assert drop > z * se, f"loss fell by {drop:.4f}, not more than {z} standard errors ({z} x {se:.4f}): {losses}"
