"""Target-method exp. 2 (5.2.2): identity through the text (fuse MLP) and an `id` cross-attention with its own projection head (`unet.image_proj`); no LoRA.

    python -m persongen_jax.train --config configs/id_text_and_crossattn.py --workdir runs/id_text_and_crossattn \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import default, ip_adapter_id


def get_config(arg=None):
    c = ip_adapter_id.get_config()
    c.id_injection = "both"  # exp. 1 with the identity through the text (fuse MLP) too
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, image_proj=1e-5, adapters=1e-5)
    return default.variant(c, arg)
