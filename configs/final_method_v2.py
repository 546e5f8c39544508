"""The *final method* (configs/final_method.py: a parallel `bg` cross-attention on P_bg) on PhotoMaker V2
(configs/photomaker_v2.py): the V2 encoder's perceiver and fuse MLP, LoRA and the new layers train.

    python -m persongen_jax.train --config configs/final_method_v2.py --workdir runs/final_method_v2 \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker_v2 \
        --config.init.arcface=weights/arcface_r50 --config.data.dir=data/ids
"""

from configs import default, photomaker_v2


def get_config(arg=None):
    c = photomaker_v2.get_config()
    c.adapters.names = ("bg",)
    c.trainable.adapters = default.group("adapters", 1e-5)
    return default.variant(c, arg)
