"""Reproduction exp. 3 (5.1.3): only the image-encoder projection heads + fuse MLP (1e-5), no LoRA.

    python -m persongen_jax.train --config configs/heads_mlp.py --workdir runs/heads_mlp \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids

Laptop-sized check (tiny random model, synthetic data, 2 steps):

    python -m persongen_jax.train --config configs/heads_mlp.py:tiny --workdir /tmp/heads_mlp
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.init.photomaker_lora = False
    c.lora.rank = 0
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5)
    c.optim.warmup_steps = 0
    return default.variant(c, arg)
