"""Reproduction exp. 4 (5.1.4): heads + fuse MLP + LoRA rank 1, everything at 1e-5.

    python -m persongen_jax.train --config configs/heads_mlp_lora1_1e5.py --workdir runs/heads_mlp_lora1_1e5 \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids

Laptop-sized check (tiny random model, synthetic data, 2 steps):

    python -m persongen_jax.train --config configs/heads_mlp_lora1_1e5.py:tiny --workdir /tmp/heads_mlp_lora1_1e5
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.init.photomaker_lora = False
    c.lora.rank, c.lora.alpha = 1, 1.0
    c.optim.warmup_steps = 0
    return default.variant(c, arg)
