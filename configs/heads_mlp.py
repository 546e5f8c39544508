"""Reproduction exp. 3 (5.1.3): only the image-encoder projection heads + fuse MLP (1e-5), no LoRA.

    python -m persongen_jax.train --config configs/heads_mlp.py --workdir runs/heads_mlp \
        --config.init.sdxl=weights/sdxl --config.init.id_encoder=weights/clip_vit_l14_id_encoder --config.data.dir=data/ids
"""

from configs import default, no_lora


def get_config(arg=None):
    c = no_lora.get_config()
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5)  # exp. 2 without the image encoder
    return default.variant(c, arg)
