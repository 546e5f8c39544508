"""The *target method*: sequential adapters general -> bg -> body -> identity (skip connections: any condition may be absent); identity also through the text as in PhotoMaker.

    python -m persongen_jax.train --config configs/target_method.py --workdir runs/target_method \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids

Laptop-sized check (tiny random model, synthetic data, 2 steps):

    python -m persongen_jax.train --config configs/target_method.py:tiny --workdir /tmp/target_method
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402
import baseline  # noqa: E402


def get_config(arg=None):
    c = baseline.get_config()
    c.adapters.names = ("bg", "body", "id")
    c.adapters.mode = "sequential"
    c.id_injection = "both"
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-5, adapters=1e-5, image_proj=1e-5)
    return default.variant(c, arg)
