"""The *target method*: sequential adapters general -> bg -> body -> identity (skip connections: any condition may be absent); identity also through the text as in PhotoMaker.

    python -m persongen_jax.train --config configs/target_method.py --workdir runs/target_method \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.adapters.names = ("bg", "body", "id")
    c.adapters.mode = "sequential"
    c.id_injection = "both"
    c.trainable.adapters = default.group("adapters", 1e-5)
    c.trainable.image_proj = default.group("image_proj", 1e-5)
    return default.variant(c, arg)
