"""Reproduction exp. 2 (5.1.2): no LoRA; whole image encoder + heads + fuse MLP at 1e-5, from CLIP weights.

    python -m persongen_jax.train --config configs/no_lora.py --workdir runs/no_lora \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = default.from_clip(baseline.get_config())
    c.lora.rank = 0
    c.trainable = default.groups(image_encoder=1e-5, heads=1e-5, fuse_mlp=1e-5)
    return default.variant(c, arg)
