"""Reproduction exp. 1 (thesis 5.1.1): whole CLIP image encoder + heads + fuse MLP (1e-5) and LoRA r64 (1e-4), from CLIP (not PhotoMaker) weights.

    python -m persongen_jax.train --config configs/full_encoder_mlp_lora64.py --workdir runs/full_encoder_mlp_lora64 \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = default.from_clip(baseline.get_config())
    c.trainable = default.groups(image_encoder=1e-5, heads=1e-5, fuse_mlp=1e-5, lora=1e-4)
    return default.variant(c, arg)
