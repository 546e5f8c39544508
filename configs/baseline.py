"""The *baseline* (reproduction exp. 7, 5.1.8): PhotoMaker init; heads + fuse MLP + LoRA r64 at 1e-5 with a 500-step linear warmup.

    python -m persongen_jax.train --config configs/baseline.py --workdir runs/baseline \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import default


def get_config(arg=None):
    c = default.get_config()
    c.init.photomaker_lora = True
    c.lora.rank, c.lora.alpha = 64, 64.0
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-5)
    c.optim.warmup_steps = 500
    return default.variant(c, arg)
