"""LPIPS (the `lpips` package's `LPIPS(net="alex", version="0.1")`, lpips=True, spatial=False), Flax NNX.

    d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(s(x0))) - n(f_l(s(x1))))^2 )

x in [-1, 1] (`normalize=True` in lpips maps [0, 1] there first); s = the ScalingLayer, (x - shift) / scale
with lpips' constants; f_l = the backbone's 5 ReLU outputs (torchvision AlexNet `features` split at
[0:2], [2:5], [5:8], [8:10], [10:12]; lpips' default backbone, the only one ported); n = unit-normalise
over channels, x / (sqrt(sum x^2) + 1e-10); w_l = the linear calibration layer `lin{l}` (1x1 conv, no bias,
channels -> 1); the spatial mean, then the sum over layers. Output [B].

Names mirror lpips' module (`net.slice2.3.weight`: the conv at index 3 of AlexNet's features, in slice 2;
`lin2.model.1.weight`: the 1x1 conv after lpips' dropout). `preprocess_torch_state_dict` drops what the
distance does not read: the duplicate `lins.*` entries of the same layers, the ScalingLayer buffers
(constants here) and, from a state dict saved without dropout, renames `linK.model.0` -> `linK.model.1`.
Input [B, H, W, 3] channels-last.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import Conv
from persongen_jax.models.modeling import ConfigMixin, field_parser, register_model

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# Per slice: ("conv", features index, in, out, kernel, stride, padding) or ("pool", kernel, stride); a ReLU
# follows every conv.
NETS: dict[str, list[list[tuple]]] = {
    "alex": [
        [("conv", 0, 3, 64, 11, 4, 2)],
        [("pool", 3, 2), ("conv", 3, 64, 192, 5, 1, 2)],
        [("pool", 3, 2), ("conv", 6, 192, 384, 3, 1, 1)],
        [("conv", 8, 384, 256, 3, 1, 1)],
        [("conv", 10, 256, 256, 3, 1, 1)],
    ],
}


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    """net: the backbone ("alex", lpips' default; the only one ported)."""

    net: str = "alex"

    def __post_init__(self):
        if self.net not in NETS:
            raise ValueError(f"net={self.net!r}: expected one of {sorted(NETS)}")


class Backbone(nnx.Module):
    """The backbone's convs as `slice{1..5}.{features index}`; returns the 5 ReLU outputs."""

    def __init__(self, net: str, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.spec = NETS[net]
        for i, ops in enumerate(self.spec, start=1):
            convs = {
                str(op[1]): Conv(
                    op[2], op[3], op[4], stride=op[5], padding=op[6], dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for op in ops
                if op[0] == "conv"
            }
            setattr(self, f"slice{i}", nnx.Dict(convs))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x [B, H, W, 3] (LPIPS-scaled) -> the feature map after each of the backbone's 5 ReLU stages."""
        outs = []
        for i, ops in enumerate(self.spec, start=1):
            convs = getattr(self, f"slice{i}")
            for op in ops:
                if op[0] == "pool":  # torch MaxPool2d, no padding (floor)
                    x = nnx.max_pool(x, (op[1], op[1]), strides=(op[2], op[2]), padding="VALID")
                else:
                    x = jax.nn.relu(convs[str(op[1])](x))
            outs.append(x)
        return outs


class NetLinLayer(nnx.Module):
    """lpips' NetLinLayer: (dropout at training) + a 1x1 conv without bias, channels -> 1; `model.1`."""

    def __init__(self, chn_in: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.model = nnx.Dict(
            {"1": Conv(chn_in, 1, 1, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)}
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] (unit-normalised feature differences, squared) -> [B, H, W, 1]."""
        return self.model["1"](x)


def _unit(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """lpips.normalize_tensor on channels-last features."""
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


@register_model
class LPIPS(ConfigMixin, nnx.Module):
    """(in0, in1) [B, H, W, 3] in [-1, 1] -> LPIPS distance [B]."""

    _parse_config = staticmethod(field_parser(LPIPSConfig))  # {"net": "alex"}

    def __init__(self, config: LPIPSConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.net = Backbone(config.net, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chns = [[op for op in ops if op[0] == "conv"][-1][3] for ops in NETS[config.net]]  # each slice's output
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lin0 = NetLinLayer(chns[0], **kw)
        self.lin1 = NetLinLayer(chns[1], **kw)
        self.lin2 = NetLinLayer(chns[2], **kw)
        self.lin3 = NetLinLayer(chns[3], **kw)
        self.lin4 = NetLinLayer(chns[4], **kw)

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """lpips.LPIPS state dict -> our keys (see the module docstring)."""
        out = {}
        for k, v in sd.items():
            if k.startswith(("lins.", "scaling_layer.")):
                continue
            out[re.sub(r"^(lin\d+)\.model\.0\.", r"\1.model.1.", k)] = v
        return out

    def __call__(self, in0: jax.Array, in1: jax.Array) -> jax.Array:
        """in0, in1 [B, H, W, 3] in [-1, 1] -> [B]."""
        dtype = self.lin0.model["1"].kernel.dtype
        shift, scale = jnp.asarray(SHIFT, dtype), jnp.asarray(SCALE, dtype)
        feats0 = self.net((in0.astype(dtype) - shift) / scale)
        feats1 = self.net((in1.astype(dtype) - shift) / scale)
        total = jnp.zeros((in0.shape[0],), jnp.float32)
        lins = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        for lin, f0, f1 in zip(lins, feats0, feats1):
            diff = jnp.square(_unit(f0) - _unit(f1))
            total = total + jnp.mean(lin(diff).astype(jnp.float32), axis=(1, 2, 3))
        return total
