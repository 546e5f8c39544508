"""The *final method* (5.2.4 / section 6): the baseline + a parallel `bg` cross-attention on P_bg; heads, fuse MLP, LoRA and the new layers train.

    python -m persongen_jax.train --config configs/final_method.py --workdir runs/final_method \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker --config.data.dir=data/ids
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    c.adapters.names = ("bg",)
    c.trainable.adapters = default.group("adapters", 1e-5)
    return default.variant(c, arg)
