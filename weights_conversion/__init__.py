"""PyTorch (diffusers / transformers) -> Flax NNX weight conversion: `python -m weights_conversion`."""

from weights_conversion.core import ConversionError  # noqa: F401
