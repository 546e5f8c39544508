"""Offline evaluation models for tests and benchmarks: CLIP, an ArcFace IResNet, an SCRFD-layout detector.

    make_tiny_clip("clip/")                                  # transformers CLIPModel -> `weights_conversion clip`
    make_arcface_onnx("r.onnx", **TINY_ARCFACE)            # torch IResNet -> ONNX (insightface layout)
    make_tiny_arcface("arcface/")                           # ... converted by `weights_conversion arcface`
    make_tiny_detector("faces/")                            # faces/det_tiny.onnx, 9 SCRFD outputs

`TorchIResNet` follows insightface recognition/arcface_torch/backbones/iresnet.py (IBasicBlock, no
dropout / fp16), scaled by `widths`; weights, BatchNorm statistics and PReLU slopes are random.

The detector is not a trained network: it has the exact output layout of insightface's det_10g /
scrfd_10g_bnkps files (scores, box distances and keypoint offsets for strides 8/16/32 with 2 anchors
per cell, fixed input size) and reports one face -- a fixed box and 5 landmarks in its input
coordinates, from one stride-32 anchor -- with score sigmoid(50 * (mean(x) - threshold)) over the
normalised input x = (pixel - 127.5) / 128. So a black image has no face, ordinary images have one,
and everything downstream (decoding, rescaling, NMS, alignment, embedding) runs as with a real file.
Needs torch (the `[torch]` extra) and onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persongen_jax.testing.torch_init import randomize_

TINY_ARCFACE = dict(layers=[1, 1, 1, 1], widths=[8, 16, 16, 32], num_features=16, input_size=112)
R50 = dict(layers=[3, 4, 14, 3], widths=[64, 128, 256, 512], num_features=512, input_size=112)


def _torch_classes():
    import torch
    from torch import nn

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            if self.downsample is not None:
                identity = self.downsample(x)
            return out + identity

    class TorchIResNet(nn.Module):
        def __init__(self, layers, widths, num_features, input_size):
            super().__init__()
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
            self.prelu = nn.PReLU(self.inplanes)
            for i, (n, planes) in enumerate(zip(layers, widths)):
                setattr(self, f"layer{i + 1}", self._make_layer(planes, n, stride=2))
            self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-05)
            side = input_size // 2 ** len(layers)
            self.fc = nn.Linear(widths[-1] * side * side, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-05)
            self.n_stages = len(layers)

        def _make_layer(self, planes, blocks, stride):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
            )
            layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            for i in range(self.n_stages):
                x = getattr(self, f"layer{i + 1}")(x)
            x = torch.flatten(self.bn2(x), 1)
            return self.features(self.fc(x))

    return IBasicBlock, TorchIResNet


def torch_iresnet(layers, widths, num_features, input_size, seed: int = 0):
    """A random TorchIResNet in eval mode (weights ~ N(0, 1/fan_in), BN stats and PReLU slopes random)."""
    import torch
    from torch import nn

    _, cls = _torch_classes()
    m = cls(layers, widths, num_features, input_size)
    g = randomize_(m, seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            if isinstance(mod, nn.PReLU):  # slopes of both signs, not the 0.25 default
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5)
    return m.eval()


def export_onnx(
    module,
    path: str | Path,
    example,
    *,
    output_names,
    dynamic_batch: bool = True,
    dynamic_axes: dict | None = None,
    **kw,
) -> Path:
    """TorchScript ONNX export (dynamo=False: the dynamo exporter needs onnxscript, not a dependency)."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = dynamic_axes or ({"input.1": {0: "batch"}} if dynamic_batch else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=["input.1"],
                output_names=list(output_names),
                dynamic_axes=dyn,
                dynamo=False,
                do_constant_folding=True,
                **kw,
            )
    return path


def make_arcface_onnx(path: str | Path, *, layers, widths, num_features, input_size, seed: int = 0) -> Path:
    """An insightface-layout recognition ONNX file (BN folded into convs, as the released files)."""
    import torch

    m = torch_iresnet(layers, widths, num_features, input_size, seed)
    return export_onnx(m, path, torch.randn(2, 3, input_size, input_size), output_names=["embedding"])


def make_tiny_arcface(folder: str | Path, seed: int = 0, **shape) -> Path:
    """TINY_ARCFACE (or `shape`) exported to ONNX and converted into an IResNet folder."""
    from weights_conversion.onnx_arcface import convert_arcface

    folder = Path(folder)
    src = make_arcface_onnx(folder.parent / f"{folder.name}.onnx", seed=seed, **{**TINY_ARCFACE, **shape})
    convert_arcface(src, folder)
    return folder


def transformer_sizes(*, hidden: int, mlp: int, layers: int, heads: int) -> dict:
    """The four sizes of a transformers config under the names that CLIP's text and vision towers, ViT and
    Qwen2's language model share (hidden_size, intermediate_size: the MLP's, num_hidden_layers,
    num_attention_heads), to spread into a config dict."""
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)


def feature_extractor_config(kind: str, size: int, mean, std, resample: int, **more) -> dict:
    """A preprocessor_config.json in the older form of the hub's files (`feature_extractor_type` KIND, an int
    SIZE) that resizes with the PIL filter number RESAMPLE and normalises with MEAN / STD; MORE adds keys."""
    steps = {"do_normalize": True, "do_resize": True, "resample": resample, "size": size}
    return {"feature_extractor_type": kind, "image_mean": list(mean), "image_std": list(std), **steps, **more}


TINY_SIZES = transformer_sizes(hidden=32, mlp=64, layers=2, heads=4)  # the tiny reference towers here and in tiny_build
TINY_CLIP = dict(
    text_config=dict(TINY_SIZES, max_position_embeddings=77, eos_token_id=2),
    vision_config=dict(TINY_SIZES, image_size=32, patch_size=8),
    projection_dim=16,
)


def make_tiny_clip(folder: str | Path, seed: int = 3, *, source: str | Path | None = None, convert: bool = True):
    """A random transformers CLIPModel (TINY_CLIP, the tiny tokenizer's vocabulary) saved to `source`
    (default FOLDER.src) with tokenizer files, converted into FOLDER. Returns the torch model."""
    import transformers

    from persongen_jax.testing.tiny_sdxl import VOCAB_SIZE, write_tiny_tokenizer
    from weights_conversion.convert import convert_clip

    folder = Path(folder)
    source = Path(source) if source else folder.parent / f"{folder.name}.src"
    # bos inside the tiny vocabulary (CLIPTextConfig's default 49406 makes transformers warn "bos_token_id must
    # be `None` or an integer within the vocabulary"); the text model never reads it (eos_token_id=2: argmax pooling).
    cfg = transformers.CLIPConfig(
        text_config={**TINY_CLIP["text_config"], "vocab_size": VOCAB_SIZE, "bos_token_id": VOCAB_SIZE - 2},
        vision_config=TINY_CLIP["vision_config"],
        projection_dim=TINY_CLIP["projection_dim"],
    )
    model = transformers.CLIPModel(cfg).eval()
    randomize_(model, seed)  # default init has unit norm scales / zero biases: perturb everything
    model.save_pretrained(source)
    write_tiny_tokenizer(source)
    if convert:
        convert_clip(source, folder)
    return model


def detector_face(input_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The face the tiny detector reports, in its input pixels: box [4] and landmarks [5, 2]."""
    from persongen_jax.evaluation.faces import ARCFACE_TEMPLATE

    s = input_size / 64.0
    box = np.array([16, 10, 48, 58], np.float32) * s
    kps = (ARCFACE_TEMPLATE * (32.0 / 112.0) + np.array([16.0, 12.0], np.float32)) * s
    return box, kps.astype(np.float32)


def make_tiny_detector(folder: str | Path, *, input_size: int = 64, threshold: float = -0.5) -> Path:
    """folder/det_tiny.onnx: an SCRFD-layout detector with a fixed [1, 3, S, S] input (see module doc)."""
    import torch
    from torch import nn

    if input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
    box, kps = detector_face(input_size)
    strides = (8, 16, 32)

    class TinySCRFD(nn.Module):
        def __init__(self):
            super().__init__()
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            g = input_size // 32
            col, row = min(int(round(cx / 32)), g - 1), min(int(round(cy / 32)), g - 1)
            ax, ay = col * 32.0, row * 32.0
            for s in strides:
                n = (input_size // s) ** 2 * 2
                onehot, d_box, d_kps = torch.zeros(n, 1), torch.zeros(n, 4), torch.zeros(n, 10)
                if s == 32:
                    i = (row * g + col) * 2  # (row, col, anchor 0) in SCRFD's anchor order
                    onehot[i] = 1.0
                    d_box[i] = torch.tensor([ax - box[0], ay - box[1], box[2] - ax, box[3] - ay]) / s
                    d_kps[i] = torch.from_numpy((kps - np.array([ax, ay], np.float32)).reshape(-1) / s)
                self.register_buffer(f"onehot{s}", onehot)
                self.register_buffer(f"box{s}", d_box)
                self.register_buffer(f"kps{s}", d_kps)

        def forward(self, x):
            m = x.mean()
            p = torch.sigmoid(50.0 * (m - threshold))
            zero = 0.0 * m  # keeps every output a computed tensor in the graph
            scores = [getattr(self, f"onehot{s}") * p for s in strides]
            boxes = [getattr(self, f"box{s}") + zero for s in strides]
            kpss = [getattr(self, f"kps{s}") + zero for s in strides]
            return (*scores, *boxes, *kpss)

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in strides]
    example = torch.zeros(1, 3, input_size, input_size)
    return export_onnx(
        TinySCRFD().eval(), Path(folder) / "det_tiny.onnx", example, output_names=names, dynamic_batch=False
    )


def make_random_scrfd(folder: str | Path, seed: int = 0, *, score_threshold: float = 1.5) -> Path:
    """folder/scrfd_random.onnx: a random network with SCRFD's exact head layout and a dynamic input size.

    A conv stem, then per stride (8, 16, 32) average pooling and 1x1 heads with 2 anchors per cell:
    scores sigmoid(3 (z - score_threshold)) of the standardised logits z (about 7% of the anchors above
    0.5 by default, so many overlapping candidates reach NMS), box distances softplus(.) + 0.5 and keypoint offsets in stride units,
    flattened in SCRFD's (row, col, anchor) order. For comparing decoding + NMS + alignment with
    insightface's own SCRFD class (`scripts/check_insightface_parity.py`) on many detections.
    """
    import torch
    from torch import nn

    strides = (8, 16, 32)

    class RandomSCRFD(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.heads = nn.ModuleList(nn.Conv2d(8, 2 * (1 + 4 + 10), 1) for _ in strides)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1))

        def forward(self, x):
            f = torch.relu(self.stem(x))
            scores, boxes, kpss = [], [], []
            for s, head in zip(strides, self.heads):
                o = head(nn.functional.avg_pool2d(f, s))  # [1, 30, H/s, W/s]
                o = o.permute(0, 2, 3, 1)  # [1, H/s, W/s, 30]
                sc, bx, kp = o[..., :2], o[..., 2:10], o[..., 10:]  # per anchor: 1 + 4 + 10
                z = (sc - sc.mean()) / (sc.std() + 1e-6)  # standardised per level: any image has peaks
                scores.append(torch.sigmoid(3.0 * (z - score_threshold)).reshape(-1, 1))
                boxes.append((nn.functional.softplus(bx) + 0.5).reshape(-1, 4))
                kpss.append((2.0 * kp).reshape(-1, 10))
            return (*scores, *boxes, *kpss)

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in strides]
    dyn = {"input.1": {2: "height", 3: "width"}, **{n: {0: "anchors"} for n in names}}
    return export_onnx(
        RandomSCRFD().eval(),
        Path(folder) / "scrfd_random.onnx",
        torch.zeros(1, 3, 64, 64),
        output_names=names,
        dynamic_axes=dyn,
    )
