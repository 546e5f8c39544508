"""Everything a build depends on, in one dataclass: the CLI fills it, every stage reads its part.

Defaults are the research's settings (thesis section 4.3, PhotoMaker's ID-oriented pipeline): shorter
side >= 512, a face box of >= 256 x 256, verification on ArcFace cosine, crops resized to 1024 (512 for
the research's 512 runs), captions and their split from one Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from persongen_jax.conditions import CLASS_WORDS
from persongen_jax.data.format import DEFAULT_CAPTION_FIELDS, DEFAULT_TRIGGER_WORD, MAX_FILE_BYTES

CAPTION_BACKENDS = ("transformers", "openai")
FACE_MASKS = ("none", "ellipse")
# Files larger than this are fingerprinted by name and size, not hashed (a 16 GB captioner would take a
# minute to hash on every start); detector and ArcFace files are far smaller and hashed whole.
HASH_LIMIT = 1 << 30
# The captions fields the split fills are the text conditions' `source` fields (conditions.py); the JSON key
# the split prompt asks for is the field without this prefix (caption_bg -> "bg": the condition's name).
CAPTION_FIELD_PREFIX = "caption_"


def split_key(field_name: str) -> str:
    """The split answer's JSON key of a captions field: "caption_expr" -> "expr"."""
    return field_name[len(CAPTION_FIELD_PREFIX):]


def default_prompt(name: str) -> str:
    """The packaged prompt `prompts/<name>.txt` (caption or split)."""
    return resources.files("persongen_jax.data.build").joinpath("prompts", f"{name}.txt").read_text()


@dataclass(frozen=True)
class ModelSpec:
    """A captioning model: `backend` transformers (a local folder in `model`) or openai (`model` is the
    served name at `endpoint`, e.g. http://host:8000/v1)."""
    backend: str
    model: str
    endpoint: str | None = None
    max_new_tokens: int = 256
    timeout_s: float = 300.0
    retries: int = 3
    concurrency: int = 8           # openai: requests in flight per worker
    batch_size: int = 8            # images (or captions) per generate call / per batch of requests
    fingerprint: str = ""          # filled by `fingerprinted`: what the cache keys on

    def describe(self) -> dict:
        """The spec as recorded in index.json["build"] (no fingerprint, no tuning knobs)."""
        d = dict(backend=self.backend, model=self.model, max_new_tokens=self.max_new_tokens)
        if self.endpoint:
            d["endpoint"] = self.endpoint
        return d


@dataclass(frozen=True)
class BuildSettings:
    """All options of a build (the CLI's flags; field comments say what each is); `check` validates them."""
    src: str                                   # folder (or Beam filesystem URL) holding persons/<id>/<image>
    dst: str                                   # local or mounted folder: the dataset, and DST/_work
    detector: str                              # insightface model folder or SCRFD .onnx
    arcface: str                               # converted ArcFace IResNet folder (`weights_conversion arcface`)
    caption: ModelSpec
    split: ModelSpec
    caption_prompt: str = field(default_factory=lambda: default_prompt("caption"))
    split_prompt: str = field(default_factory=lambda: default_prompt("split"))
    split_fields: tuple[str, ...] = DEFAULT_CAPTION_FIELDS  # the captions fields the split fills (see split_key)
    min_side: int = 512
    min_face: int = 256
    det_size: int = 640
    det_thresh: float = 0.5
    detector_threads: int = 0                  # onnxruntime intra-op threads per worker (0: its default)
    verify_threshold: float = 0.4
    verify_min_samples: int = 2
    min_images: int = 2
    embed_batch_size: int = 32
    resolution: int = 1024
    crop_scale: float = 0.0                    # 0: the largest square; s > 0: s x the face box's longer side
    face_mask: str = "none"
    jpeg_quality: int = 95
    class_words: tuple[str, ...] = CLASS_WORDS
    # Real captions are a sentence or two (max_new_tokens 256 is about 1,000 characters): a longer one is a
    # model that did not stop for this image.
    caption_max_chars: int = 2000
    trigger_word: str = DEFAULT_TRIGGER_WORD
    num_shards: int = 0                        # 0: one shard per bundle (streamed); N: N shards (a shuffle)
    max_file_bytes: int = MAX_FILE_BYTES
    caption_accelerator: str | None = None     # Beam resource hint for the caption / split stages
    progress_every_s: float = 10.0
    detector_fingerprint: str = ""
    arcface_fingerprint: str = ""

    def check(self) -> None:
        """ValueError (one line, naming the option) for a setting that cannot work."""
        if self.detector_threads < 0:
            raise ValueError(f"--detector-threads must be >= 0, got {self.detector_threads}")
        for name in ("min_side", "min_face", "resolution", "det_size", "embed_batch_size", "caption_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_images < 2:
            raise ValueError(f"--min-images must be >= 2 (identity verification compares a person's images), "
                             f"got {self.min_images}")
        if self.verify_min_samples < 1:
            raise ValueError(f"--verify-min-samples must be >= 1, got {self.verify_min_samples}")
        if not -1.0 <= self.verify_threshold <= 1.0:
            raise ValueError(f"--verify-threshold is a cosine in [-1, 1], got {self.verify_threshold}")
        if not 0.0 < self.det_thresh < 1.0:
            raise ValueError(f"--det-thresh must be in (0, 1), got {self.det_thresh}")
        if self.crop_scale < 0:
            raise ValueError(f"--crop-scale must be 0 (largest square) or > 0, got {self.crop_scale}")
        if self.face_mask not in FACE_MASKS:
            raise ValueError(f"--face-mask {self.face_mask!r}; expected one of {list(FACE_MASKS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if self.num_shards < 0:
            raise ValueError(f"--num-shards must be >= 0, got {self.num_shards}")
        if not self.class_words or any(not w.strip() or " " in w.strip() for w in self.class_words):
            raise ValueError(f"--class-words must be single words, got {list(self.class_words)}")
        if not self.trigger_word.strip() or " " in self.trigger_word.strip():
            raise ValueError(f"--trigger-word must be one word, got {self.trigger_word!r}")
        if "{caption}" not in self.split_prompt:
            raise ValueError("the split prompt must contain {caption} (where the caption is inserted)")
        if not self.split_fields or len(set(self.split_fields)) != len(self.split_fields) or not all(
                re.fullmatch(CAPTION_FIELD_PREFIX + r"[a-z][a-z0-9_]*", f) for f in self.split_fields):
            raise ValueError(f"--split-fields must be distinct {CAPTION_FIELD_PREFIX}<name> fields, got "
                             f"{list(self.split_fields)}")
        for f in self.split_fields:
            if f'"{split_key(f)}"' not in self.split_prompt:
                raise ValueError(f'the split prompt never asks for the JSON key "{split_key(f)}" (the answer\'s key '
                                 f"for --split-fields {f}); edit the prompt or the fields")
        for what, spec in (("caption", self.caption), ("split", self.split)):
            if spec.backend not in CAPTION_BACKENDS:
                raise ValueError(f"--{what}-backend {spec.backend!r}; expected one of {list(CAPTION_BACKENDS)}")
            if not spec.model:
                raise ValueError(f"--{what}-model is required (a local model folder for transformers, the served "
                                 "model name for openai)")
            if spec.backend == "openai" and not spec.endpoint:
                raise ValueError(f"--{what}-backend openai needs --{what}-endpoint (e.g. http://localhost:8000/v1)")
            if spec.backend == "transformers" and not (Path(spec.model) / "config.json").is_file():
                raise ValueError(f"--{what}-model {spec.model}: not a local transformers model folder (no "
                                 "config.json); models are never downloaded by the build")
            if spec.max_new_tokens < 1 or spec.batch_size < 1 or spec.concurrency < 1 or spec.retries < 0:
                raise ValueError(f"--{what}-*: max tokens, batch size and concurrency must be >= 1, retries >= 0")
            if not spec.timeout_s > 0:
                raise ValueError(f"--{what}-timeout must be > 0 seconds, got {spec.timeout_s}")

    def fingerprinted(self) -> "BuildSettings":
        """A copy with the model fingerprints that the stage caches key on."""
        return dataclasses.replace(
            self, detector_fingerprint=fingerprint_path(self.detector), arcface_fingerprint=fingerprint_path(self.arcface),
            caption=_model_fingerprinted(self.caption), split=_model_fingerprinted(self.split))

    def describe(self) -> dict:
        """The settings and model names recorded in index.json["build"]."""
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("caption", "split", "caption_prompt", "split_prompt", "dst", "progress_every_s",
                          "detector_fingerprint", "arcface_fingerprint")}
        d["class_words"] = list(self.class_words)
        d["split_fields"] = list(self.split_fields)
        d["caption"] = self.caption.describe()
        d["split"] = self.split.describe()
        d["caption_prompt_sha256"] = sha256_text(self.caption_prompt)
        d["split_prompt_sha256"] = sha256_text(self.split_prompt)
        return d


def sha256_text(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes (prompts in cache keys and index.json)."""
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(*parts) -> str:
    """sha256 of the JSON of `parts`: the name of a cache entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_path(path: str | os.PathLike) -> str:
    """A content fingerprint of a model file or folder: sha256 over (relative name, size, content hash)
    of every file; files over HASH_LIMIT count by name and size only."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{size}\0".encode())
        if size <= HASH_LIMIT:
            with open(f, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
    return h.hexdigest()


def _model_fingerprinted(spec: ModelSpec) -> ModelSpec:
    # An endpoint serves a model by name: the name is its identity (the URL may change between runs).
    fp = fingerprint_path(spec.model) if spec.backend == "transformers" else f"openai:{spec.model}"
    return dataclasses.replace(spec, fingerprint=fp)
