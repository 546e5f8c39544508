"""Reproduction exp. 2 (5.1.2): no LoRA; whole image encoder + heads + fuse MLP at 1e-5, from CLIP weights.

    python -m persongen_jax.train --config configs/no_lora.py --workdir runs/no_lora \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids

Laptop-sized check (tiny random model, synthetic data, 2 steps):

    python -m persongen_jax.train --config configs/no_lora.py:tiny --workdir /tmp/no_lora
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.init.photomaker_lora = False
    c.lora.rank = 0
    c.trainable = default.groups(image_encoder=1e-5, heads=1e-5, fuse_mlp=1e-5)
    c.optim.warmup_steps = 0
    return default.variant(c, arg)
