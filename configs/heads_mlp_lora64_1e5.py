"""Reproduction exp. 6 (5.1.7): PhotoMaker init; heads + fuse MLP + LoRA r64, all at 1e-5, no warmup.

    python -m persongen_jax.train --config configs/heads_mlp_lora64_1e5.py --workdir runs/heads_mlp_lora64_1e5 \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.optim.warmup_steps = 0  # the baseline without its warmup
    return default.variant(c, arg)
