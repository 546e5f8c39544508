"""insightface ArcFace ONNX (IResNet: w600k_r50, glintr100, ...) -> persongen_jax `IResNet` folder.

    python -m weights_conversion arcface SRC.onnx DST

The graph is walked from its input along the IResNet structure (see
`persongen_jax.models.iresnet`), and every node is matched to a module of the port:

    stem    Conv [-> BatchNormalization] -> PRelu
    block   x -> BatchNormalization -> Conv [-> BN] -> PRelu -> Conv [-> BN] -> Add(., x or Conv1x1(x) [-> BN])
    tail    BatchNormalization -> Flatten (or Reshape [B, -1]) -> Gemm (or MatMul [+ Add]) [-> BN] -> output

The config (blocks per stage, widths, embedding size, input size, BatchNorm epsilon, whether the
conv->BN pairs / the features BN are folded) is inferred from the graph. Strict like the
PyTorch conversion: every node must be matched, every initializer used, every parameter of the
model filled with the right shape; otherwise ConversionError names the file and the offending
nodes/initializers. Identity / Dropout(eval) nodes are pass-throughs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from persongen_jax.models import modeling
from weights_conversion.core import ConversionError, _listing


class _Graph:
    """Name-resolved view of an ONNX graph with bookkeeping of what the walk used."""

    def __init__(self, model, source: str):
        import onnx
        from onnx import numpy_helper

        self.source = source
        g = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.used_consts: set[str] = set()
        self.alias: dict[str, str] = {}
        self.nodes = []
        for n in g.node:
            if n.op_type == "Constant":
                attrs = {a.name: a for a in n.attribute}
                if "value" not in attrs:
                    raise ConversionError(f"{source}: Constant node {n.name!r} without a tensor `value`")
                self.consts[n.output[0]] = numpy_helper.to_array(attrs["value"].t)
            elif n.op_type in ("Identity", "Dropout"):
                self.alias[n.output[0]] = n.input[0]
            else:
                self.nodes.append(n)
        self.attrs = {id(n): {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers[self.resolve(i)].append(n)
        self.matched: set[int] = set()
        inputs = [i.name for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ConversionError(f"{source}: expected one image input, found {inputs}")
        self.input = inputs[0]
        if len(g.output) != 1:
            raise ConversionError(f"{source}: expected one output (the embedding), found {[o.name for o in g.output]}")
        self.output = self.resolve(g.output[0].name)

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, node, index: int) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            raise ConversionError(f"{self.source}: {node.op_type} node {node.name!r} lacks input {index}")
        name = self.resolve(node.input[index])
        if name not in self.consts:
            raise ConversionError(
                f"{self.source}: {node.op_type} node {node.name!r}: input {name!r} is not an "
                "initializer (export with do_constant_folding=True)"
            )
        self.used_consts.add(name)
        return self.consts[name]

    def const_name(self, node, index: int) -> str:
        return self.resolve(node.input[index])

    def next(self, x: str, op: str | tuple[str, ...], where: str, *, optional: bool = False):
        """The one unmatched consumer of tensor `x` with op type `op`, marked matched."""
        ops = (op,) if isinstance(op, str) else op
        cands = [n for n in self.consumers.get(x, []) if n.op_type in ops and id(n) not in self.matched]
        if len(cands) > 1 and not optional:
            raise ConversionError(
                f"{self.source}: {where}: tensor {x!r} feeds several {'/'.join(ops)} nodes {[n.name for n in cands]}"
            )
        if not cands:
            if optional:
                return None
            found = [f"{n.op_type} {n.name!r}" for n in self.consumers.get(x, []) if id(n) not in self.matched]
            raise ConversionError(
                f"{self.source}: {where}: expected a {'/'.join(ops)} node after tensor {x!r}, "
                f"found {found or 'nothing'}"
            )
        self.matched.add(id(cands[0]))
        return cands[0]

    def only_consumer_is(self, x: str, op: str):
        users = [n for n in self.consumers.get(x, []) if id(n) not in self.matched]
        return len(users) == 1 and users[0].op_type == op

    def out(self, node) -> str:
        return self.resolve(node.output[0])


class _Walker:
    """Walks the IResNet structure, collecting {torch-style key: (array, onnx initializer names)}."""

    def __init__(self, g: _Graph):
        self.g = g
        self.params: dict[str, tuple[np.ndarray, str]] = {}
        self.eps: dict[float, list[str]] = defaultdict(list)
        self.conv_folded: dict[str, bool] = {}

    def put(self, key: str, value: np.ndarray, node, index: int):
        self.params[key] = (
            np.asarray(value, np.float32),
            f"{node.op_type} {node.name!r} input {self.g.const_name(node, index)!r}",
        )

    def conv(self, x: str, prefix: str, *, k: int, stride: int, where: str, bn_key: str | None, in_ch: int):
        """Conv with (kernel k, stride, pad k//2) -> [BN]; returns (output, out_channels)."""
        g = self.g
        n = g.next(x, "Conv", where)
        a = g.attrs[id(n)]
        w = g.const(n, 0 + 1)
        if w.ndim != 4 or w.shape[2:] != (k, k):
            raise ConversionError(
                f"{g.source}: {where}: Conv {n.name!r} weight {g.const_name(n, 1)!r} has shape "
                f"{w.shape}, expected [out, in, {k}, {k}]"
            )
        if w.shape[1] != in_ch:
            raise ConversionError(
                f"{g.source}: {where}: Conv {n.name!r} weight {g.const_name(n, 1)!r} has shape "
                f"{w.shape}: {w.shape[1]} input channels, its input has {in_ch}"
            )
        p = k // 2
        checks = {"strides": [stride, stride], "pads": [p, p, p, p], "group": 1, "dilations": [1, 1]}
        for name, want in checks.items():
            got = a.get(name, want)
            if list(np.atleast_1d(got)) != list(np.atleast_1d(want)):
                raise ConversionError(f"{g.source}: {where}: Conv {n.name!r} has {name}={got}, IResNet needs {want}")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ConversionError(f"{g.source}: {where}: Conv {n.name!r} uses auto_pad; expected explicit pads")
        self.put(f"{prefix}.weight", w, n, 1)
        has_bias = len(n.input) > 2 and bool(n.input[2])
        if has_bias:
            b = g.const(n, 2)
            if b.shape != (w.shape[0],):
                raise ConversionError(
                    f"{g.source}: {where}: Conv {n.name!r} bias {g.const_name(n, 2)!r} has shape "
                    f"{b.shape}, its weight {g.const_name(n, 1)!r} {w.shape} needs ({w.shape[0]},)"
                )
            self.put(f"{prefix}.bias", b, n, 2)
        y = g.out(n)
        bn = (
            g.next(y, "BatchNormalization", where, optional=True)
            if g.only_consumer_is(y, "BatchNormalization")
            else None
        )
        if bn is not None:
            if has_bias:
                raise ConversionError(
                    f"{g.source}: {where}: Conv {n.name!r} has a bias and a BatchNormalization "
                    "after it; IResNet's convs have no bias (unfolded) or no BN (folded)"
                )
            y = self.bn(bn, bn_key)
        elif not has_bias:
            raise ConversionError(
                f"{g.source}: {where}: Conv {n.name!r} has neither a bias (folded BatchNorm) "
                "nor a BatchNormalization after it"
            )
        self.conv_folded[where] = bn is None
        return y, w.shape[0]

    def bn(self, n, prefix: str) -> str:
        g = self.g
        a = g.attrs[id(n)]
        if a.get("training_mode", 0):
            raise ConversionError(f"{g.source}: BatchNormalization {n.name!r} is in training mode")
        if len(n.output) > 1 and any(n.output[1:]):
            raise ConversionError(
                f"{g.source}: BatchNormalization {n.name!r} outputs batch statistics (a training-mode export)"
            )
        for i, leaf in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
            self.put(f"{prefix}.{leaf}", g.const(n, i), n, i)
        self.eps[round(float(a.get("epsilon", 1e-5)), 12)].append(n.name)
        return g.out(n)

    def prelu(self, x: str, prefix: str, where: str) -> str:
        g = self.g
        n = g.next(x, "PRelu", where)
        slope = g.const(n, 1)
        # torch exports PReLU(C) on NCHW with the slope unsqueezed to [C, 1, 1].
        if slope.ndim > 1 and any(d != 1 for d in slope.shape[1:]):
            raise ConversionError(
                f"{g.source}: {where}: PRelu {n.name!r} slope {g.const_name(n, 1)!r} has shape "
                f"{slope.shape}; expected per-channel [C] or [C, 1, 1]"
            )
        self.put(f"{prefix}.weight", slope.reshape(-1), n, 1)
        return g.out(n)

    def block(self, x: str, prefix: str, *, first: bool, in_ch: int) -> tuple[str, int, bool]:
        """One IBasicBlock; returns (output, out channels, had a downsample)."""
        g = self.g
        where = prefix
        ds_conv = g.next(x, "Conv", where, optional=True)
        if ds_conv is not None:  # peeked: put it back and match it properly below
            g.matched.discard(id(ds_conv))
        y = self.bn(g.next(x, "BatchNormalization", f"{where}.bn1"), f"{prefix}.bn1")
        y, planes = self.conv(
            y, f"{prefix}.conv1", k=3, stride=1, where=f"{where}.conv1", bn_key=f"{prefix}.bn2", in_ch=in_ch
        )
        y = self.prelu(y, f"{prefix}.prelu", where)
        stride = 2 if ds_conv is not None else 1
        y, planes2 = self.conv(
            y, f"{prefix}.conv2", k=3, stride=stride, where=f"{where}.conv2", bn_key=f"{prefix}.bn3", in_ch=planes
        )
        identity = x
        if ds_conv is not None:
            identity, _ = self.conv(
                x,
                f"{prefix}.downsample.0",
                k=1,
                stride=2,
                where=f"{where}.downsample",
                bn_key=f"{prefix}.downsample.1",
                in_ch=in_ch,
            )
        elif first:
            raise ConversionError(
                f"{g.source}: {where}: the first block of a stage must have a downsample "
                f"(Conv 1x1 stride 2) on its input {x!r}"
            )
        add = g.next(y, "Add", f"{where} residual")
        if sorted(g.resolve(i) for i in add.input) != sorted([y, identity]):
            raise ConversionError(
                f"{g.source}: {where}: Add {add.name!r} adds {list(add.input)}, expected the "
                f"block output {y!r} and the shortcut {identity!r}"
            )
        if planes != planes2:
            raise ConversionError(f"{g.source}: {where}: conv1 has {planes} channels, conv2 {planes2}")
        return g.out(add), planes, ds_conv is not None

    def walk(self) -> dict:
        g = self.g
        y, stem = self.conv(g.input, "conv1", k=3, stride=1, where="conv1", bn_key="bn1", in_ch=3)
        y = self.prelu(y, "prelu", "stem")
        layers: list[int] = []
        widths: list[int] = []
        channels = stem
        # Blocks follow while the current tensor feeds a BatchNormalization that feeds a Conv
        # (a block's bn1); the tail's bn2 feeds Flatten/Reshape instead.
        while True:
            bns = [n for n in g.consumers.get(y, []) if n.op_type == "BatchNormalization" and id(n) not in g.matched]
            if len(bns) != 1 or not any(c.op_type == "Conv" for c in g.consumers.get(g.out(bns[0]), [])):
                break
            starts_stage = any(n.op_type == "Conv" and id(n) not in g.matched for n in g.consumers.get(y, []))
            if starts_stage:
                layers.append(0)
            if not layers:
                raise ConversionError(f"{g.source}: layer1.0: the first block has no downsample Conv on {y!r}")
            prefix = f"layer{len(layers)}.{layers[-1]}"
            y, planes, _ = self.block(y, prefix, first=starts_stage, in_ch=channels)
            channels = planes
            if starts_stage:
                widths.append(planes)
            elif planes != widths[-1]:
                raise ConversionError(f"{g.source}: {prefix}: {planes} channels inside a stage of {widths[-1]}")
            layers[-1] += 1
        if not layers:
            raise ConversionError(f"{g.source}: no IResNet blocks found after the stem")
        y = self.bn(g.next(y, "BatchNormalization", "bn2"), "bn2")
        flat = g.next(y, ("Flatten", "Reshape"), "flatten")
        if flat.op_type == "Flatten":
            if g.attrs[id(flat)].get("axis", 1) != 1:
                raise ConversionError(f"{g.source}: Flatten {flat.name!r} must have axis=1")
        else:
            shape = g.const(flat, 1).tolist()
            if len(shape) != 2 or shape[1] != -1 or shape[0] not in (0, 1, -1):
                raise ConversionError(f"{g.source}: Reshape {flat.name!r} to {shape}; expected a flatten [B, -1]")
        y = g.out(flat)
        fc = g.next(y, ("Gemm", "MatMul"), "fc")
        a = g.attrs[id(fc)]
        w = g.const(fc, 1)
        if fc.op_type == "Gemm":
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                raise ConversionError(f"{g.source}: Gemm {fc.name!r}: transA/alpha/beta other than 0/1/1")
            w_torch = w if a.get("transB", 0) else w.T
            self.put("fc.weight", w_torch, fc, 1)
            if len(fc.input) < 3 or not fc.input[2]:
                raise ConversionError(f"{g.source}: Gemm {fc.name!r} has no bias")
            self.put("fc.bias", g.const(fc, 2), fc, 2)
            y = g.out(fc)
        else:
            self.put("fc.weight", w.T, fc, 1)
            y = g.out(fc)
            add = g.next(y, "Add", "fc bias")
            bias_idx = [i for i, n in enumerate(add.input) if g.resolve(n) != y]
            if len(bias_idx) != 1:
                raise ConversionError(f"{g.source}: Add {add.name!r} after MatMul {fc.name!r} is not a bias add")
            self.put("fc.bias", g.const(add, bias_idx[0]), add, bias_idx[0])
            y = g.out(add)
        feats = g.next(y, "BatchNormalization", "features", optional=True)
        if feats is not None:
            y = self.bn(feats, "features")
        if y != g.output:
            raise ConversionError(f"{g.source}: the walk ended at tensor {y!r}, but the graph output is {g.output!r}")

        fc_in, num_features = self.params["fc.weight"][0].shape[1], self.params["fc.weight"][0].shape[0]
        side = int(round((fc_in / widths[-1]) ** 0.5))
        if side * side * widths[-1] != fc_in:
            raise ConversionError(f"{g.source}: fc takes {fc_in} features, not {widths[-1]} x a square")
        folded = set(self.conv_folded.values())
        if len(folded) != 1:
            mixed = sorted(k for k, v in self.conv_folded.items() if v)
            raise ConversionError(
                f"{g.source}: some conv->BatchNorm pairs are folded and some are not "
                f"(folded: {mixed[:10]}); IResNet supports all or none"
            )
        if len(self.eps) != 1:
            raise ConversionError(f"{g.source}: BatchNormalization epsilons differ: {dict(self.eps)}")
        return dict(
            layers=layers,
            widths=widths,
            stem_width=stem,
            num_features=int(num_features),
            input_size=side * 2 ** len(layers),
            bn_eps=next(iter(self.eps)),
            bn_folded=folded.pop(),
            features_folded=feats is None,
            input_mean=127.5,
            input_std=127.5,
        )


def read_arcface_onnx(src: Path) -> tuple[dict, dict]:
    """SRC.onnx -> (IResNet config, {torch-style key: float32 array}), strictly checked."""
    import onnx

    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src}: no such file")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # onnx raises DecodeError / ValueError variants
        raise ConversionError(f"{src}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    g = _Graph(model, str(src))
    walker = _Walker(g)
    config = walker.walk()
    unmatched = [f"{n.op_type} {n.name!r}" for n in g.nodes if id(n) not in g.matched]
    unused = sorted(set(g.consts) - g.used_consts)
    # Constants only referenced by dead Identity nodes (the torch exporter emits those) are harmless.
    referenced = {g.resolve(i) for n in g.nodes for i in n.input}
    unused = [u for u in unused if u in referenced or u in {i.name for i in model.graph.initializer}]
    if unmatched or unused:
        lines = [f"{src}: graph is not an insightface IResNet"]
        if unmatched:
            lines.append(_listing("unmatched nodes", unmatched))
        if unused:
            lines.append(_listing("unused initializers", unused))
        raise ConversionError("\n".join(lines))
    return config, walker.params


def convert_arcface(src: Path, dst: Path, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """Converts SRC.onnx into the folder DST (config.json + params/); returns a summary."""
    import jax.numpy as jnp

    from persongen_jax.models.iresnet import IResNet
    from weights_conversion.convert import atomic_output, check_output
    from weights_conversion.core import to_flax_layout, torch_key

    check_output(dst, overwrite, [src])
    config, params = read_arcface_onnx(src)
    abstract = modeling.abstract_model(IResNet, config)
    expected = modeling.flat_params(abstract)
    by_key = {torch_key(p): p for p in expected}
    missing = sorted(k for k in by_key if k not in params)
    unexpected = sorted(f"{k} ({params[k][1]})" for k in params if k not in by_key)
    mismatched, out = [], {}
    for k, p in by_key.items():
        if k not in params:
            continue
        value, origin = params[k]
        value = to_flax_layout(p, value)
        if tuple(value.shape) != tuple(expected[p].shape):
            mismatched.append(
                f"{k} ({origin}: {tuple(params[k][0].shape)}, model built from the graph expects "
                f"{tuple(expected[p].shape)} in our layout)"
            )
            continue
        out[p] = jnp.asarray(np.ascontiguousarray(value), dtype=jnp.dtype(dtype) if dtype else jnp.float32)
    if missing or unexpected or mismatched:
        lines = [
            f"{src}: ONNX weights do not match the IResNet inferred from its graph "
            f"(layers={config['layers']}, widths={config['widths']})"
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(_listing(title, items))
        raise ConversionError("\n".join(lines))
    with atomic_output(dst, overwrite, [src]) as tmp:
        cfg = dict(config, source=Path(src).name)
        cfg[modeling.CLASS_KEY] = "IResNet"
        (tmp / modeling.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        modeling.save_params(out, tmp / modeling.PARAMS_DIR)
    return (
        f"IResNet layers={config['layers']} widths={config['widths']} features={config['num_features']} "
        f"input={config['input_size']} bn_folded={config['bn_folded']}"
    )
