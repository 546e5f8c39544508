"""ArcFace recognition network: insightface's IResNet (arcface_torch `backbones/iresnet.py`), Flax NNX.

The reference (deepinsight/insightface `recognition/arcface_torch/backbones/iresnet.py`):

    conv1 3x3/1 (no bias) -> bn1 -> prelu                         stem, 64 channels
    layer1..layer4: IBasicBlock x layers[i], the first one stride 2 with a downsample
        IBasicBlock(x) = bn3(conv2_s(prelu(bn2(conv1(bn1(x)))))) + (downsample(x) or x)
        downsample     = [conv 1x1/s (no bias), BatchNorm2d]
    bn2 -> dropout(0) -> flatten in NCHW order -> fc -> features (BatchNorm1d)  -> [B, num_features]

Presets: r50 = layers [3, 4, 14, 3] (insightface `w600k_r50`, buffalo_l / antelopev2 recognition),
r100 = [3, 13, 30, 3] (`glintr100`), r18 / r34, and `tiny` for tests.

Names mirror the PyTorch module (`layer3.5.bn2.running_var`, `downsample.0.weight`,
`prelu.weight`, `features.weight`), so a torch state dict converts with the generic rule of
`weights_conversion.core`; ONNX files convert with `weights_conversion arcface`.

BatchNorm is inference-only: running statistics are stored as nnx.Param (the converted-folder
format restores Params only). The network is a frozen evaluator; nothing here trains it.

Folded BatchNorm. Exported insightface ONNX files (and `torch.onnx.export` in eval mode) fold each
BatchNorm that follows a conv into the conv (weight scaled, bias added). `bn_folded: true` builds
that graph: the convs that precede a BatchNorm in the reference (conv1, block.conv1, block.conv2,
downsample.0) carry a bias and the BatchNorm after them is absent (None). The BatchNorms that
precede a conv (block.bn1, bn2) cannot be folded exactly (zero padding) and always exist.
`features_folded: true`: the features BatchNorm1d is folded into fc.

Input: aligned face crops [B, H, W, 3] channels-last, RGB, normalised as insightface does,
(pixel - 127.5) / 127.5 (see `preprocess`); the insightface PyTorch exports (w600k_r50, glintr100)
do NOT contain this normalisation, insightface's ArcFaceONNX applies it outside the graph.
H = W = input_size (112). Output: [B, num_features] embeddings, not L2-normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persongen_jax.models import modeling
from persongen_jax.models.layers import Conv, Linear
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, register_model

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class IResNetConfig(ModelConfig):
    """layers: IBasicBlocks per stage; widths: channels per stage; stem_width: conv1 channels.

    Each stage halves the resolution, so fc takes widths[-1] * fc_spatial^2 features,
    fc_spatial = input_size / 2^len(layers) (input_size / 16 for four stages).
    """

    layers: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    num_features: int = 512
    input_size: int = 112
    bn_eps: float = 1e-5
    bn_folded: bool = False
    features_folded: bool = False
    input_mean: float = 127.5
    input_std: float = 127.5

    @property
    def fc_spatial(self) -> int:
        """Side of the last feature map that fc flattens: input_size / 2^len(layers) (112 -> 7)."""
        return self.input_size // 2 ** len(self.layers)


def parse_config(config: Mapping[str, Any] | IResNetConfig) -> IResNetConfig:
    """IResNetConfig fields as a dict -> IResNetConfig (keys that are not fields are ignored); an
    IResNetConfig passes through. ValueError when layers / widths are empty, differ in length or have a
    stage without blocks, or when 2^len(layers) does not divide input_size."""
    if isinstance(config, IResNetConfig):
        return config
    known = {f.name for f in dataclasses.fields(IResNetConfig)}
    kwargs = {k: v for k, v in config.items() if k in known}
    for k in ("layers", "widths"):
        if k in kwargs:
            kwargs[k] = tuple(int(v) for v in kwargs[k])
    cfg = IResNetConfig(**kwargs)
    if len(cfg.layers) != len(cfg.widths) or not cfg.layers or min(cfg.layers) < 1:
        raise ValueError(
            f"IResNet config: layers {list(cfg.layers)} and widths {list(cfg.widths)} must be "
            "non-empty lists of the same length with at least one block per stage"
        )
    if cfg.input_size % 2 ** len(cfg.layers):
        raise ValueError(
            f"IResNet config: input_size={cfg.input_size} must be divisible by "
            f"2^{len(cfg.layers)} (one stride-2 block per stage)"
        )
    return cfg


_R = dict(widths=[64, 128, 256, 512], stem_width=64, num_features=512, input_size=112)
_PRESETS = {
    "r18": dict(_R, layers=[2, 2, 2, 2]),
    "r34": dict(_R, layers=[3, 4, 6, 3]),
    "r50": dict(_R, layers=[3, 4, 14, 3]),  # insightface w600k_r50
    "r100": dict(_R, layers=[3, 13, 30, 3]),  # insightface glintr100
    # Tests: two blocks in stage 1 (an identity shortcut), 32x32 input -> 2x2 before fc.
    "tiny": dict(layers=[2, 1, 1, 1], widths=[8, 16, 16, 32], stem_width=8, num_features=16, input_size=32),
}

# ----------------------------------------------------------------------------- layers


class BatchNorm(nnx.Module):
    """torch BatchNorm{1,2}d in eval mode on channels-last input: (x - mean) / sqrt(var + eps) * w + b.

    Names mirror torch (`weight` = scale, `bias`, `running_mean`, `running_var`); computed in float32.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype=None, param_dtype=jnp.float32):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_mean = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_var = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] channels-last -> same shape, in `dtype` (default: x's dtype)."""
        dtype = self.dtype or x.dtype
        f32 = lambda p: p[...].astype(jnp.float32)
        mul = f32(self.scale) * jax.lax.rsqrt(f32(self.running_var) + self.epsilon)
        y = (x.astype(jnp.float32) - f32(self.running_mean)) * mul + f32(self.bias)
        return y.astype(dtype)


class PReLU(nnx.Module):
    """torch.nn.PReLU(num_parameters=C) on channels-last input: max(x, 0) + weight * min(x, 0)."""

    def __init__(self, num_parameters: int, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.full((num_parameters,), 0.25, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] channels-last -> same shape; one slope per channel."""
        return jnp.where(x >= 0, x, self.weight[...].astype(x.dtype) * x)


def _bn_or_none(present: bool, c: int, cfg: IResNetConfig, dtype, param_dtype):
    return BatchNorm(c, epsilon=cfg.bn_eps, dtype=dtype, param_dtype=param_dtype) if present else None


class IBasicBlock(nnx.Module):
    """bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3/stride -> bn3, plus the (downsampled) input."""

    def __init__(
        self,
        cfg: IResNetConfig,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: bool,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        post_bn = not cfg.bn_folded
        self.bn1 = BatchNorm(inplanes, epsilon=cfg.bn_eps, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv(
            inplanes, planes, 3, padding=1, use_bias=cfg.bn_folded, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.bn2 = _bn_or_none(post_bn, planes, cfg, dtype, param_dtype)
        self.prelu = PReLU(planes, param_dtype=param_dtype)
        self.conv2 = Conv(
            planes,
            planes,
            3,
            stride=stride,
            padding=1,
            use_bias=cfg.bn_folded,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn3 = _bn_or_none(post_bn, planes, cfg, dtype, param_dtype)
        self.downsample: nnx.List | None
        if downsample:
            # A list so the NNX path is `downsample.0` / `downsample.1` like torch's nn.Sequential.
            self.downsample = nnx.List(
                [
                    Conv(
                        inplanes,
                        planes,
                        1,
                        stride=stride,
                        use_bias=cfg.bn_folded,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    ),
                    *([BatchNorm(planes, epsilon=cfg.bn_eps, dtype=dtype, param_dtype=param_dtype)] if post_bn else []),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, inplanes] -> [B, H / stride, W / stride, planes]."""
        out = self.conv1(self.bn1(x))
        if self.bn2 is not None:
            out = self.bn2(out)
        out = self.conv2(self.prelu(out))
        if self.bn3 is not None:
            out = self.bn3(out)
        identity = x
        if self.downsample is not None:
            for layer in self.downsample:
                identity = layer(identity)
        return out + identity


@register_model
class IResNet(ConfigMixin, nnx.Module):
    """insightface arcface_torch IResNet: aligned faces [B, S, S, 3] (normalised) -> embeddings [B, F].

    `model(preprocess(uint8_rgb_crops))`; S = config.input_size (112 for the released models).
    """

    _parse_config = staticmethod(parse_config)  # from_config: the IResNetConfig fields as a dict
    _presets = _PRESETS

    def __init__(self, config: IResNetConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv(3, cfg.stem_width, 3, padding=1, use_bias=cfg.bn_folded, rngs=rngs, **kw)
        self.bn1 = _bn_or_none(not cfg.bn_folded, cfg.stem_width, cfg, dtype, param_dtype)
        self.prelu = PReLU(cfg.stem_width, param_dtype=param_dtype)
        inplanes = cfg.stem_width
        for i, (n, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            # insightface: every stage's first block has stride 2, hence always a downsample.
            blocks = [
                IBasicBlock(cfg, inplanes if j == 0 else planes, planes, 2 if j == 0 else 1, j == 0, rngs=rngs, **kw)
                for j in range(n)
            ]
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            inplanes = planes
        self.bn2 = BatchNorm(inplanes, epsilon=cfg.bn_eps, **kw)
        self.fc = Linear(inplanes * cfg.fc_spatial**2, cfg.num_features, rngs=rngs, **kw)
        self.features = _bn_or_none(not cfg.features_folded, cfg.num_features, cfg, dtype, param_dtype)

    @classmethod
    def preset_config(cls, name: str) -> dict:
        """ "r18", "r34", "r50" (w600k_r50), "r100" (glintr100) or "tiny" (tests), with every IResNetConfig field."""
        return parse_config(super().preset_config(name)).to_dict()

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """Drops the BatchNorm `num_batches_tracked` counters of a torch state dict."""
        # torch BatchNorm's step counter is a buffer that inference never reads.
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, S, 3] normalised RGB crops -> [B, num_features]."""
        s = self.config.input_size
        if x.shape[1:] != (s, s, 3):
            raise ValueError(f"IResNet: expected input [B, {s}, {s}, 3] (channels-last), got {x.shape}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.prelu(x)
        for i in range(len(self.config.layers)):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
        x = self.bn2(x)
        # torch.flatten on NCHW: the fc weight expects channel-major order.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = self.fc(x)
        if self.features is not None:
            x = self.features(x)
        return x


def preprocess(images, *, mean: float = 127.5, std: float = 127.5) -> jax.Array:
    """uint8/float RGB aligned crops [B, S, S, 3] in [0, 255] -> (x - mean) / std as float32.

    insightface's ArcFaceONNX reads BGR (cv2) and swaps to RGB (`blobFromImages(swapRB=True)`),
    so pass RGB here.
    """
    return (jnp.asarray(images, jnp.float32) - mean) / std


def embed(model: IResNet, images, *, normalize: bool = True) -> jax.Array:
    """RGB crops in [0, 255] [B, S, S, 3] -> embeddings [B, F] (L2-normalised unless normalize=False)."""
    cfg = model.config
    e = model(preprocess(images, mean=cfg.input_mean, std=cfg.input_std)).astype(jnp.float32)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


def random_iresnet(config: Mapping[str, Any], seed: int, **kw) -> IResNet:
    """A random IResNet (`modeling.random_init`: kernels ~ N(0, 1/fan_in), seeded) with usable BatchNorm
    statistics: running_var 1 + |0.1 N(0, 1)| (random_init draws 1-D parameters around 0, and a negative
    variance is a NaN). The frozen ArcFace of tiny PhotoMaker V2 training runs (`training.model`)."""
    model = modeling.random_init(IResNet, config, seed, **kw)
    rng = np.random.default_rng([seed, 1])
    flat = modeling.flat_params(model)
    for path, value in flat.items():
        if str(path[-1]) == "running_var":
            flat[path] = jnp.asarray(1 + np.abs(0.1 * rng.standard_normal(value.shape)), value.dtype)
    return modeling.assign_params(model, flat)
