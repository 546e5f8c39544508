"""InceptionV3 as pytorch-fid computes FID features (`pytorch_fid/inception.py`, the "FID Inception"), Flax NNX.

pytorch-fid's `InceptionV3(output_blocks=[3])` (the default, 2048-d pool features):

    x in [0, 1] -> bilinear resize to 299 x 299 (align_corners=False, no antialias) -> 2x - 1
    block 0: Conv2d_1a_3x3 (s2), Conv2d_2a_3x3, Conv2d_2b_3x3 (p1), max-pool 3/2
    block 1: Conv2d_3b_1x1, Conv2d_4a_3x3, max-pool 3/2
    block 2: Mixed_5b/5c/5d (FIDInceptionA), Mixed_6a (InceptionB), Mixed_6b..6e (FIDInceptionC)
    block 3: Mixed_7a (InceptionD), Mixed_7b (FIDInceptionE_1), Mixed_7c (FIDInceptionE_2), global average

Every conv is torchvision's BasicConv2d: conv without bias -> BatchNorm (eps 1e-3, running statistics) ->
ReLU. The FID variant differs from torchvision's InceptionV3 in its pooling branches: average pools exclude
the padding (count_include_pad=False) in A, C and E_1, and E_2 (Mixed_7c) max-pools -- TensorFlow's graph,
whose weights (pt_inception-2015-12-05-6726825d.pth) pytorch-fid ships.

Names mirror torchvision's Inception3 (`Mixed_6b.branch7x7_2.conv.weight`, `...bn.running_var`), the layout
of that weights file; `preprocess_torch_state_dict` also reads pytorch-fid's InceptionV3 module layout
(`blocks.2.4.branch1x1.conv.weight`) and drops the 1008-way `fc` classifier and `num_batches_tracked`
counters, which the pool features do not use. BatchNorm statistics are nnx.Params (inference only, as the
ArcFace port). Input [B, H, W, 3] channels-last float in [0, 1]; output [B, 2048].
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.iresnet import BatchNorm
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, field_parser, register_model

FID_INPUT_SIZE = 299
FEATURES = 2048


@dataclasses.dataclass(frozen=True)
class InceptionConfig(ModelConfig):
    """pytorch-fid InceptionV3's input options (FID uses both): resize to 299 first, map [0, 1] to [-1, 1]."""

    resize_input: bool = True
    normalize_input: bool = True


class BasicConv2d(nnx.Module):
    """conv (no bias, torch padding) -> BatchNorm(eps=1e-3) -> ReLU, on [B, H, W, C]."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size,
        *,
        stride: int = 1,
        padding=0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            cin,
            cout,
            kernel_size=(kh, kw),
            strides=(stride, stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = BatchNorm(cout, epsilon=1e-3, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, Cin] -> relu(bn(conv(x))) [B, H', W', Cout]."""
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """torch max_pool2d, kernel 3 (padding with -inf)."""
    pad = ((padding, padding), (padding, padding))
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """torch avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False): the mean over the in-image
    pixels of each 3 x 3 window."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class _Block(nnx.Module):
    def _convs(self, specs: dict, **kw) -> None:
        for name, (cin, cout, k, extra) in specs.items():
            setattr(self, name, BasicConv2d(cin, cout, k, **extra, **kw))


class FIDInceptionA(_Block):
    """Inception-A block of the FID Inception (its pool branch averages without the padded zeros)."""

    def __init__(self, cin: int, pool_features: int, **kw):
        self._convs(
            {
                "branch1x1": (cin, 64, 1, {}),
                "branch5x5_1": (cin, 48, 1, {}),
                "branch5x5_2": (48, 64, 5, {"padding": 2}),
                "branch3x3dbl_1": (cin, 64, 1, {}),
                "branch3x3dbl_2": (64, 96, 3, {"padding": 1}),
                "branch3x3dbl_3": (96, 96, 3, {"padding": 1}),
                "branch_pool": (cin, pool_features, 1, {}),
            },
            **kw,
        )

    def __call__(self, x):
        """x [B, H, W, Cin] -> the four branches concatenated on channels [B, H, W, 224 + pool_features]."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x))], -1)


class InceptionB(_Block):
    """Inception-B (grid reduction): 3x3 stride-2 conv, double 3x3, max pool."""

    def __init__(self, cin: int, **kw):
        self._convs(
            {
                "branch3x3": (cin, 384, 3, {"stride": 2}),
                "branch3x3dbl_1": (cin, 64, 1, {}),
                "branch3x3dbl_2": (64, 96, 3, {"padding": 1}),
                "branch3x3dbl_3": (96, 96, 3, {"stride": 2}),
            },
            **kw,
        )

    def __call__(self, x):
        """x [B, H, W, Cin] -> [B, H/2, W/2, 768] (the branches concatenated)."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], -1)


class FIDInceptionC(_Block):
    """Inception-C block of the FID Inception (factorised 7x7 convs; pool branch without padded zeros)."""

    def __init__(self, cin: int, channels_7x7: int, **kw):
        c7 = channels_7x7
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self._convs(
            {
                "branch1x1": (cin, 192, 1, {}),
                "branch7x7_1": (cin, c7, 1, {}),
                "branch7x7_2": (c7, c7, (1, 7), row),
                "branch7x7_3": (c7, 192, (7, 1), col),
                "branch7x7dbl_1": (cin, c7, 1, {}),
                "branch7x7dbl_2": (c7, c7, (7, 1), col),
                "branch7x7dbl_3": (c7, c7, (1, 7), row),
                "branch7x7dbl_4": (c7, c7, (7, 1), col),
                "branch7x7dbl_5": (c7, 192, (1, 7), row),
                "branch_pool": (cin, 192, 1, {}),
            },
            **kw,
        )

    def __call__(self, x):
        """x [B, H, W, 768] -> [B, H, W, 768] (the four branches concatenated)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_exclude_pad(x))], -1)


class InceptionD(_Block):
    """Inception-D (grid reduction): 3x3 and 7x7-then-3x3 stride-2 branches, max pool."""

    def __init__(self, cin: int, **kw):
        self._convs(
            {
                "branch3x3_1": (cin, 192, 1, {}),
                "branch3x3_2": (192, 320, 3, {"stride": 2}),
                "branch7x7x3_1": (cin, 192, 1, {}),
                "branch7x7x3_2": (192, 192, (1, 7), {"padding": (0, 3)}),
                "branch7x7x3_3": (192, 192, (7, 1), {"padding": (3, 0)}),
                "branch7x7x3_4": (192, 192, 3, {"stride": 2}),
            },
            **kw,
        )

    def __call__(self, x):
        """x [B, H, W, 768] -> [B, H/2, W/2, 1280] (the branches concatenated)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], -1)


class FIDInceptionE(_Block):
    """FIDInceptionE_1 (average pool without padding, Mixed_7b) or _2 (max pool, Mixed_7c)."""

    def __init__(self, cin: int, *, max_pool_branch: bool, **kw):
        self.max_pool_branch = max_pool_branch
        row, col = {"padding": (0, 1)}, {"padding": (1, 0)}
        self._convs(
            {
                "branch1x1": (cin, 320, 1, {}),
                "branch3x3_1": (cin, 384, 1, {}),
                "branch3x3_2a": (384, 384, (1, 3), row),
                "branch3x3_2b": (384, 384, (3, 1), col),
                "branch3x3dbl_1": (cin, 448, 1, {}),
                "branch3x3dbl_2": (448, 384, 3, {"padding": 1}),
                "branch3x3dbl_3a": (384, 384, (1, 3), row),
                "branch3x3dbl_3b": (384, 384, (3, 1), col),
                "branch_pool": (cin, 192, 1, {}),
            },
            **kw,
        )

    def __call__(self, x):
        """x [B, H, W, Cin] -> [B, H, W, 2048] (the expanded 3x3 branches and the pool branch concatenated)."""
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pool),
            ],
            -1,
        )


# pytorch-fid InceptionV3's `blocks.i.j` -> torchvision Inception3's (our) names.
_BLOCKS = [
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
    ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
    ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
]


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """torch F.interpolate(mode="bilinear", align_corners=False) to size x size, on [B, H, W, C]: half-pixel
    centres, no antialiasing when shrinking (jax.image.resize antialiases by default)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=False)


@register_model
class FIDInceptionV3(ConfigMixin, nnx.Module):
    """images [B, H, W, 3] in [0, 1] -> pool features [B, 2048] (pytorch-fid's block 3)."""

    _parse_config = staticmethod(field_parser(InceptionConfig))  # {"resize_input": bool, "normalize_input": bool}

    def __init__(self, config: InceptionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, max_pool_branch=False, **kw)
        self.Mixed_7c = FIDInceptionE(2048, max_pool_branch=True, **kw)

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """pytorch-fid module layout -> torchvision names; fc and num_batches_tracked dropped (unused)."""
        out = {}
        for k, v in sd.items():
            if k.startswith("fc.") or k.endswith("num_batches_tracked"):
                continue
            m = re.match(r"^blocks\.(\d+)\.(\d+)\.(.*)$", k)
            if m and int(m[1]) < len(_BLOCKS) and int(m[2]) < len(_BLOCKS[int(m[1])]):
                k = f"{_BLOCKS[int(m[1])][int(m[2])]}.{m[3]}"
            out[k] = v
        return out

    def prepare(self, images: jax.Array) -> jax.Array:
        """pytorch-fid's input steps: [B, H, W, 3] in [0, 1] -> resized to 299 (resize_input) and mapped to
        [-1, 1] (normalize_input)."""
        x = images.astype(self.Conv2d_1a_3x3.conv.kernel.dtype)
        if self.config.resize_input:
            x = resize_bilinear(x, FID_INPUT_SIZE)
        return 2 * x - 1 if self.config.normalize_input else x

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [0, 1] (any size >= 75 without resize_input) -> [B, 2048]."""
        return self.trunk(self.prepare(images))

    def trunk(self, x: jax.Array) -> jax.Array:
        """The network on prepared input [B, H, W, 3] -> pool features [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for name in _BLOCKS[2] + _BLOCKS[3]:
            x = getattr(self, name)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
