"""Target-method exp. 1 (5.2.1): identity only through an IP-Adapter-style `id` cross-attention (no LoRA, no fuse MLP); PhotoMaker encoder; heads + image projection + new k/v layers at 1e-5.

    python -m persongen_jax.train --config configs/ip_adapter_id.py --workdir runs/ip_adapter_id \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.init.photomaker_lora = False
    c.lora.rank = 0
    c.adapters.names = ("id",)
    c.id_injection = "cross_attn"
    c.trainable = default.groups(heads=1e-5, image_proj=1e-5, adapters=1e-5)
    return default.variant(c, arg)
