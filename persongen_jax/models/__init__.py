"""Flax NNX ports of the SDXL UNet, VAE and CLIP encoders (names mirror diffusers/transformers).

`from_pretrained(path)` loads any converted component folder.
"""

from persongen_jax.models.clip import (  # noqa: F401
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from persongen_jax.models.controlnet import ControlNetModel  # noqa: F401
from persongen_jax.models.id_encoder import PhotoMakerIDEncoder  # noqa: F401
from persongen_jax.models.id_encoder_v2 import PhotoMakerV2IDEncoder  # noqa: F401
from persongen_jax.models.inception import FIDInceptionV3  # noqa: F401
from persongen_jax.models.iresnet import IResNet  # noqa: F401
from persongen_jax.models.lpips import LPIPS  # noqa: F401
from persongen_jax.models.modeling import from_pretrained, register_model, save_pretrained  # noqa: F401
from persongen_jax.models.t2i_adapter import T2IAdapter  # noqa: F401
from persongen_jax.models.unet import UNet2DConditionModel  # noqa: F401
from persongen_jax.models.vae import AutoencoderKL  # noqa: F401
from persongen_jax.models.vit import ViTModel  # noqa: F401
