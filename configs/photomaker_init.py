"""Reproduction exp. 5 (5.1.6): the paper's setup (whole encoder + MLP at 1e-5, LoRA r64 at 1e-4) started from the released PhotoMaker weights (ID encoder and LoRA).

    python -m persongen_jax.train --config configs/photomaker_init.py --workdir runs/photomaker_init \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.trainable = default.groups(image_encoder=1e-5, heads=1e-5, fuse_mlp=1e-5, lora=1e-4)
    c.optim.warmup_steps = 0
    return default.variant(c, arg)
