"""Target-method exp. 3 (5.2.3): `id` cross-attention only, PhotoMaker's LoRA kept and copied into the new k/v layers; heads + all LoRA (+ the new image projection) train.

    python -m persongen_jax.train --config configs/crossattn_id_lora_copy.py --workdir runs/crossattn_id_lora_copy \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.adapters.names = ("id",)
    c.adapters.copy_lora = True
    c.id_injection = "cross_attn"
    c.trainable = default.groups(heads=1e-5, lora=1e-5, image_proj=1e-5)
    return default.variant(c, arg)
