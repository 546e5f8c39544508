"""PhotoMaker V2 fine-tuning: from the converted V2 weights (ID encoder + LoRA), the V2 encoder's trainable
parts -- the QFormerPerceiver (ArcFace token projection + face perceiver resampler) and the fuse MLP, as the
PhotoMaker V2 release trains them on top of the frozen CLIP tower -- and the UNet LoRA, with the baseline's
learning rates and warmup. Each reference's ArcFace embedding comes from the dataset record (`data.build`
stores it) or from the frozen ArcFace of config.init.arcface (the demo / `data.format` datasets have none).

    python -m persongen_jax.train --config configs/photomaker_v2.py --workdir runs/photomaker_v2 \
        --config.init.sdxl=weights/sdxl --config.init.photomaker=weights/photomaker_v2 \
        --config.init.arcface=weights/arcface_r50 --config.data.dir=data/ids

`configs/photomaker_v2.py:tiny`: a tiny random V2 encoder and a tiny random ArcFace.
"""

from configs import baseline, default


def get_config(arg=None):
    c = baseline.get_config()
    default.photomaker_v2(c)
    c.trainable = default.groups(qformer_perceiver=1e-5, fuse_mlp=1e-5, lora=1e-5)
    return default.variant(c, arg)
