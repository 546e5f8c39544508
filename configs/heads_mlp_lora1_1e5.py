"""Reproduction exp. 4 (5.1.4): heads + fuse MLP + LoRA rank 1, everything at 1e-5.

    python -m persongen_jax.train --config configs/heads_mlp_lora1_1e5.py --workdir runs/heads_mlp_lora1_1e5 \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = default.from_clip(baseline.get_config())
    c.lora.rank, c.lora.alpha = 1, 1.0
    return default.variant(c, arg)
