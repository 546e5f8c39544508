"""ArcFace (insightface IResNet) port: ONNX export from a PyTorch reference -> `weights_conversion arcface`
-> JAX embeddings equal onnxruntime's within 1e-4.

The reference module (`persongen_jax.testing.tiny_eval.TorchIResNet`) follows insightface
recognition/arcface_torch/backbones/iresnet.py (IBasicBlock, IResNet without dropout/fp16), scaled down by `widths`. Weights and BatchNorm running
statistics are random so no identity BatchNorm hides a bug. Exports use the TorchScript exporter
(dynamo=False): in eval mode it folds each conv->BatchNorm pair into the conv, like the released
insightface files; training=PRESERVE keeps the BatchNormalization nodes (the unfolded graph).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_close, run_cli, torch_precise

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# The TorchScript exporter is deprecated (the dynamo one needs onnxscript, not a dependency) and warns
# that constant folding in PRESERVE mode may mutate params: with the model in eval mode it does not.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:It is recommended that constant folding:UserWarning"),
]

TINY = dict(layers=[2, 1, 1, 1], widths=[8, 16, 16, 32], num_features=16, input_size=32)


def _reference(seed=0):
    from persongen_jax.testing.tiny_eval import torch_iresnet

    torch_precise()
    return torch_iresnet(**TINY, seed=seed)


def _export(m, path: Path, *, folded: bool) -> Path:
    s = TINY["input_size"]
    kw = {} if folded else dict(training=torch.onnx.TrainingMode.PRESERVE)
    torch.onnx.export(
        m,
        torch.randn(2, 3, s, s),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}},
        dynamo=False,
        do_constant_folding=True,
        **kw,
    )
    return path


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _images(n=3, seed=0):
    s = TINY["input_size"]
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3)).astype(np.uint8)


def _ort_embed(path, images_uint8):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = ((images_uint8.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)  # insightface's blob
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _convert_and_check(src, dst, *, bn_folded):
    from persongen_jax.models import from_pretrained
    from persongen_jax.models.iresnet import IResNet, embed, preprocess

    run_cli("arcface", src, dst)
    model = from_pretrained(dst)
    assert isinstance(model, IResNet)
    assert model.config.layers == tuple(TINY["layers"]) and model.config.widths == tuple(TINY["widths"])
    assert model.config.bn_folded is bn_folded and model.config.input_size == TINY["input_size"]
    imgs = _images()
    expected = _ort_embed(src, imgs)
    assert_close(model(preprocess(imgs)), expected, rtol=1e-4, atol=1e-4, name="IResNet vs onnxruntime")
    e = np.asarray(embed(model, imgs))
    ref = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    assert_close(e, ref, rtol=1e-4, atol=1e-5, name="normalised embedding")
    return model


def test_arcface_folded_export_matches_onnxruntime(tmp_path):
    m = _reference()
    src = _export(m, tmp_path / "tiny_r.onnx", folded=True)
    ops = _ops(src)
    assert "PRelu" in ops and "Gemm" in ops
    model = _convert_and_check(src, tmp_path / "arcface", bn_folded=True)
    # Also the PyTorch module itself (the export is not the only reference).
    imgs = _images()
    with torch.no_grad():
        x = torch.from_numpy(((imgs.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2))
        ref = m(x).numpy()
    from persongen_jax.models.iresnet import preprocess

    assert_close(model(preprocess(imgs)), ref, rtol=1e-4, atol=1e-4, name="IResNet vs torch")


def test_arcface_unfolded_export_matches_onnxruntime(tmp_path):
    src = _export(_reference(seed=3), tmp_path / "tiny_bn.onnx", folded=False)
    bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    n_blocks = sum(TINY["layers"])
    assert bns == 1 + 3 * n_blocks + len(TINY["layers"]) + 2  # stem, per block, downsamples, bn2, features
    _convert_and_check(src, tmp_path / "arcface", bn_folded=False)


def test_arcface_conversion_error_names_initializer(tmp_path):
    from onnx import numpy_helper

    src = _export(_reference(), tmp_path / "tiny_r.onnx", folded=True)
    model = onnx.load(str(src))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    name = bn.input[3]  # a running mean
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(init).shape[0] + 1, np.float32), name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    proc = run_cli("arcface", bad, tmp_path / "out", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert name in proc.stderr and "running_mean" in proc.stderr and str(bad) in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()

    # An extra, unused initializer is reported too.
    model = onnx.load(str(src))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "stray_weight"))
    onnx.save(model, str(bad))
    proc = run_cli("arcface", bad, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "stray_weight" in proc.stderr, proc.stderr


def test_arcface_presets_shapes():
    import jax
    from flax import nnx

    from persongen_jax.models.iresnet import IResNet
    from persongen_jax.models.modeling import abstract_model, flat_params

    cfg = IResNet.preset_config("r50")
    assert cfg["layers"] == [3, 4, 14, 3] and IResNet.preset_config("r100")["layers"] == [3, 13, 30, 3]
    n = sum(math.prod(v.shape) for v in flat_params(abstract_model(IResNet, cfg)).values())
    assert 43e6 < n < 44e6, n  # w600k_r50: 43.6 M parameters (incl. BN statistics)
    tiny = IResNet.from_config(IResNet.preset_config("tiny"), rngs=nnx.Rngs(0))
    out = jax.jit(lambda m, x: m(x))(tiny, np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 16)
