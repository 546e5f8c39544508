"""Metrics chosen by name (as big_vision's evaluators): each turns generated images into per-image scores.

    metrics = build(["clip_t", "face_sim"], {"clip": "weights/clip-l", "face_detector": "antelopev2",
                                             "arcface": "weights/arcface_r100"})
    prepared = {m.name: m.prepare_references(ref_images, ref_names) for m in metrics}    # once per identity
    result = metric(images, prompts, [prepared[metric.name]] * len(images))           # MetricResult

A metric is a class registered here with

    name           the key of its scores everywhere: score rows, scores.csv, metrics.json, TensorBoard
                   (eval/<set>/<name>), history.jsonl and the --compare plots
    title, axis_label, digits, card_digits      how reports and plots show it
    found_key, missing_key, missing_label, missing_title     only for a metric that can find nothing to
                   score in an image (Face-Sim: no face): the row's bool column (face_found), the per-set
                   count (no_face), the report's label ("no face") and section title ("No face detected")
    requires       {option: what it is} that `from_options` needs (scoring model folders)

and the methods `from_options(options)`, `prepare_references(images, names)` (per-identity data, e.g.
reference embeddings; may raise naming a bad reference), `__call__(images, prompts, references)` and
`warm_up()` (compiles its programs ahead of the first call; optional).

A metric of a whole set of images (FID: the generated set against a reference set; Face Div.: the images
of one identity and prompt against each other) sets `per_set = True` (a `SetMetric`) and implements `reset()`,
`accumulate(images, groups)` (called chunk by chunk with each image's (set, identity, prompt) key; the
rows get no value) and `set_values()` -> {set name and "all": {name: value or None, name + "_note": text
when there is no value, ...}}, which the evaluation writes into metrics.json's per-set summaries.
The report, the CSV, metrics.json, validation during training and `evaluate --compare` work from the
names that come back, so a new metric is one class here (and its model in its own module).

This module imports no JAX: reports and plots read the display attributes without loading a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_METRICS = ("clip_t", "face_sim")


@dataclasses.dataclass
class MetricResult:
    """Per-image values (None: left out of the means) and, for metrics with a found_key, what was found."""

    values: list[float | None]
    found: list[bool] | None = None


class Metric:
    """Base class: display attributes and the interface; subclasses register with `@register`."""

    name: str = ""
    title: str = ""
    axis_label: str = ""
    digits: int = 4  # means table
    card_digits: int = 3  # per-image caption
    found_key: str | None = None
    missing_key: str | None = None
    missing_label: str | None = None
    missing_title: str | None = None
    requires: Mapping[str, str] = {}
    per_set: bool = False  # one value per set (FID, Face Div.), not a mean of per-image values

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Metric":
        """Builds the metric from scoring options (model folders and settings)."""
        raise NotImplementedError

    def prepare_references(self, images: Sequence, names: Sequence[str]) -> Any:
        """Per-identity data computed once from its reference images (None when the metric needs none)."""
        return None

    def __call__(self, images: Sequence, prompts: Sequence[str], references: Sequence[Any]) -> MetricResult:
        """images (uint8 [H, W, 3] arrays or PIL), the text scored for each, each image's prepared references."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What metrics.json records about how this metric scored."""
        return {}

    def warm_up(self) -> None:
        """Compiles what scoring runs (fixed-size batches: one program each), so that a server's first
        request is not the slow one (the web app calls it at start-up); nothing by default."""

    # per_set metrics only
    def reset(self) -> None:
        """Forgets what `accumulate` gathered (a new evaluation starts)."""

    def accumulate(self, images: Sequence, groups: Sequence[tuple]) -> None:
        """images and, per image, its (set, identity, prompt) key."""
        raise NotImplementedError

    def set_values(self) -> dict[str, dict]:
        """{set name, and "all": {name: value or None, ...}} of what was accumulated."""
        raise NotImplementedError


def mean_cosine_x100(embeddings: np.ndarray, references) -> list[float]:
    """CLIP-I / DINO: unit embeddings [N, D] and, per image, its identity's unit reference embeddings
    [R_i, D] -> 100 x the mean over the references of the cosine, one float per image."""
    return [
        100.0 * float(np.mean(np.asarray(r, np.float32) @ np.asarray(e, np.float32)))
        for e, r in zip(embeddings, references)
    ]


REGISTRY: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: makes the metric available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Metric]:
    """The metric class registered as `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def display(name: str) -> type[Metric]:
    """The class whose display attributes describe `name` (a bare `Metric` titled by its name for a metric
    this installation does not know, e.g. in an old history file)."""
    if name in REGISTRY:
        return REGISTRY[name]
    return type(name, (Metric,), {"name": name, "title": name, "axis_label": name})


def add_scoring_arguments(group) -> None:
    """The scoring-model options every command that scores shares (evaluate, the web app): the folders the
    registered metrics require and the face detector's settings. `scoring_options(args)` reads them back."""
    from pathlib import Path

    group.add_argument("--clip", type=Path, help="converted CLIPModel folder (weights_conversion clip) for CLIP-T")
    group.add_argument("--dino", type=Path, help="converted DINO ViT folder (weights_conversion dino) for DINO")
    group.add_argument(
        "--inception", type=Path, help="converted FID InceptionV3 folder (weights_conversion inception) for FID"
    )
    group.add_argument(
        "--fid-reference",
        type=Path,
        help="FID's reference: an image folder or pytorch-fid's .npz statistics (mu, sigma)",
    )
    group.add_argument("--lpips", type=Path, help="converted LPIPS folder (weights_conversion lpips) for Face Div.")
    group.add_argument(
        "--face-models",
        type=Path,
        help="insightface model folder with an SCRFD detector (antelopev2, buffalo_l) or the detector .onnx",
    )
    group.add_argument("--arcface", type=Path, help="converted ArcFace folder (weights_conversion arcface)")
    group.add_argument(
        "--face-select",
        choices=["largest", "score"],
        default="largest",
        help="which detected face is scored: the largest box, or the most confident",
    )
    group.add_argument("--det-thresh", type=float, default=0.5, help="SCRFD detection score threshold")
    group.add_argument(
        "--det-size", type=int, default=640, help="detector input size (files with a fixed size use theirs)"
    )


def scoring_options(args, **overrides) -> dict:
    """The `build` options of the arguments `add_scoring_arguments` declared (+ overrides: no_face,
    batch_size)."""
    return {
        "clip": args.clip,
        "dino": args.dino,
        "inception": args.inception,
        "fid_reference": args.fid_reference,
        "lpips": args.lpips,
        "face_detector": args.face_models,
        "arcface": args.arcface,
        "det_thresh": args.det_thresh,
        "det_size": args.det_size,
        "face_select": args.face_select,
        **overrides,
    }


def build(names: Sequence[str], options: Mapping[str, Any]) -> list[Metric]:
    """The metrics `names` built from `options`; a ValueError lists every option a chosen metric lacks."""
    classes = [get(n) for n in names]
    missing = [
        f"{c.name} needs {key} ({what})" for c in classes for key, what in c.requires.items() if not options.get(key)
    ]
    if missing:
        raise ValueError("scoring options missing: " + "; ".join(missing))
    # One scoring model for the metrics that share it (CLIP-T and CLIP-I: one CLIP in memory, one compile).
    shared: dict = {}
    built = []
    for c in classes:
        try:
            built.append(c.from_options({**options, SHARED_KEY: shared}))
        except (ValueError, FileNotFoundError) as e:  # a missing folder, one of another kind: named by metric
            raise ValueError(f"metric {c.name}: {e}") from None
    return built


SHARED_KEY = "_shared_models"


def shared_model(options: Mapping[str, Any], key: tuple, load):
    """The model `load()` returns, loaded once per `build` call for every metric that asks with the same
    key (e.g. ("clip", folder, batch size)); without `build`'s cache, loaded each time."""
    cache = options.get(SHARED_KEY)
    if cache is None:
        return load()
    if key not in cache:
        cache[key] = load()
    return cache[key]


def _batch_size(options: Mapping[str, Any]) -> int:
    return int(options.get("batch_size") or 32)


def _face_options(options: Mapping[str, Any]) -> dict:
    """The face scorers' detector settings and batch size (`face_sim.FaceScorer.from_pretrained`)."""
    det_size = int(options.get("det_size") or 640)
    return {
        "det_size": (det_size, det_size),
        "det_thresh": float(options.get("det_thresh") or 0.5),
        "batch_size": _batch_size(options),
    }


class ScorerMetric(Metric):
    """A metric that scores with one scorer object (`from_options` builds it)."""

    def __init__(self, scorer):
        self.scorer = scorer


class ReferenceCosine(ScorerMetric):
    """CLIP-I / DINO: 100 x the mean cosine of an image's unit embedding (`embed`) to its identity's unit
    reference embeddings (`mean_cosine_x100`)."""

    digits, card_digits = 2, 1

    def embed(self, images) -> np.ndarray:
        """Unit embeddings [N, D] of the images."""
        raise NotImplementedError

    def prepare_references(self, images, names):
        return self.embed(images)

    def __call__(self, images, prompts, references):
        return MetricResult(mean_cosine_x100(self.embed(images), references))

    def warm_up(self):
        self.embed([np.zeros((8, 8, 3), np.uint8)])


class SetMetric(ScorerMetric):
    """A metric of whole sets of images (FID, Face Div.): `accumulate` gathers, `set_values` computes."""

    per_set = True


class CLIPMetric(ScorerMetric):
    """CLIP-T and CLIP-I: one CLIP model, loaded once when both are chosen (`shared_model`)."""

    digits, card_digits = 2, 1
    requires = {"clip": "a converted CLIP folder: --clip / config.eval.clip"}

    @classmethod
    def from_options(cls, options):
        from persongen_jax.evaluation.clip_t import CLIPTScorer

        batch_size = _batch_size(options)
        return cls(
            shared_model(
                options,
                ("clip", str(options["clip"]), batch_size),
                lambda: CLIPTScorer.from_pretrained(options["clip"], batch_size=batch_size),
            )
        )


@register
class CLIPT(CLIPMetric):
    """CLIP-T: 100 x cosine of the CLIP image and text embeddings (`clip_t.CLIPTScorer`)."""

    name, title, axis_label = "clip_t", "CLIP-T", "CLIP-T (100 × CLIP cosine)"

    def __call__(self, images, prompts, references):
        return MetricResult([float(v) for v in self.scorer(images, prompts)])

    def warm_up(self):
        self.scorer([np.zeros((8, 8, 3), np.uint8)], [""])


@register
class CLIPI(CLIPMetric, ReferenceCosine):
    """CLIP-I: 100 x the mean over the identity's reference images of the cosine between the CLIP image
    embeddings (`get_image_features`) of the generated image and the reference (PhotoMaker's Table 1); the
    images preprocessed as CLIP-T's, the model CLIP-T's (one copy in memory when both are chosen)."""

    name, title, axis_label = "clip_i", "CLIP-I", "CLIP-I (100 × CLIP image cosine)"

    def embed(self, images):
        return self.scorer.image_embeddings(images)


@register
class DINO(ReferenceCosine):
    """DINO: 100 x the mean over the identity's reference images of the cosine between DINO ViT embeddings
    (the CLS token after the final LayerNorm) of the generated image and the reference (`dino.DINOScorer`)."""

    name, title, axis_label = "dino", "DINO", "DINO (100 × DINO ViT cosine)"
    requires = {"dino": "a converted DINO ViT folder: --dino / config.eval.dino"}

    @classmethod
    def from_options(cls, options):
        from persongen_jax.evaluation.dino import DINOScorer

        return cls(DINOScorer.from_pretrained(options["dino"], batch_size=_batch_size(options)))

    def embed(self, images):
        return self.scorer.embeddings(images)


@register
class FID(SetMetric):
    """FID between the generated images of a set (and of all sets) and the reference set (`--fid-reference`:
    an image folder or pytorch-fid's .npz), on pytorch-fid's InceptionV3 pool features (`fid.FIDScorer`);
    features are streamed into running statistics, so memory does not grow with the number of images."""

    name, title, axis_label = "fid", "FID", "FID (lower is better)"
    digits, card_digits = 2, 1
    requires = {
        "inception": "a converted FID InceptionV3 folder: --inception / config.eval.inception",
        "fid_reference": "a reference image folder or .npz statistics: --fid-reference / config.eval.fid_reference",
    }

    def __init__(self, scorer, reference):
        super().__init__(scorer)
        self.reference_path = reference
        self.reference = scorer.reference_statistics(reference)  # read now: a bad reference fails first
        self.stats: dict = {}

    @classmethod
    def from_options(cls, options):
        from persongen_jax.evaluation.fid import FIDScorer

        scorer = FIDScorer.from_pretrained(options["inception"], batch_size=_batch_size(options))
        return cls(scorer, options["fid_reference"])

    def reset(self):
        self.stats = {}

    def accumulate(self, images, groups):
        from persongen_jax.evaluation.fid import FeatureStats

        feats = self.scorer.features_of(images)
        for key in {g[0] for g in groups} | {"all"}:
            rows = [i for i, g in enumerate(groups) if key == "all" or g[0] == key]
            self.stats.setdefault(key, FeatureStats()).update(feats[rows])

    def set_values(self):
        from persongen_jax.evaluation.fid import frechet_distance

        out = {}
        for key in sorted(self.stats, key=lambda k: k == "all"):  # the sets, then all
            stats = self.stats[key]
            if key == "all" and len(self.stats) == 2:  # one set: "all" is that set (a 2048-d sqrt saved)
                out[key] = dict(next(iter(out.values())))
            elif stats.n < 2:
                out[key] = {self.name: None, f"{self.name}_note": f"n/a ({stats.n} image; FID needs 2)"}
            else:
                out[key] = {self.name: frechet_distance(*stats.mean_cov(), *self.reference)}
        return out

    def settings(self):
        return {"fid_reference": str(self.reference_path)}


@register
class FaceDiv(SetMetric):
    """Face Div.: mean pairwise LPIPS between the detected face regions of the images generated for one
    identity and prompt (`face_div.FaceDivScorer`, definition in its docstring); per set, the mean over its
    (identity, prompt) groups; a group with fewer than 2 images with a face is "n/a" (counted), never a
    number."""

    name, title, axis_label = "face_div", "Face Div.", "Face Div. (pairwise LPIPS of face regions)"
    digits, card_digits = 4, 3
    requires = {
        "lpips": "a converted LPIPS folder: --lpips / config.eval.lpips",
        "face_detector": "an insightface folder with an SCRFD detector: --face-models / config.eval.face_detector",
    }

    def __init__(self, scorer):
        super().__init__(scorer)
        self.groups: dict = {}

    @classmethod
    def from_options(cls, options):
        from persongen_jax.evaluation.face_div import FaceDivScorer

        return cls(FaceDivScorer.from_pretrained(options["face_detector"], options["lpips"], **_face_options(options)))

    def reset(self):
        self.groups = {}

    def accumulate(self, images, groups):
        for image, key in zip(images, groups):
            entry = self.groups.setdefault(tuple(key), {"images": 0, "crops": []})
            entry["images"] += 1
            crop = self.scorer.face_region(image)
            if crop is not None:
                entry["crops"].append(crop)

    def set_values(self):
        per_set: dict = {}
        for key, entry in self.groups.items():
            value = self.scorer.group_diversity(entry["crops"]) if len(entry["crops"]) >= 2 else None
            for name in (key[0], "all"):
                per_set.setdefault(name, []).append((key, len(entry["crops"]), entry["images"], value))
        out = {}
        for name, rows in per_set.items():
            values = [v for *_, v in rows if v is not None]
            na = [f"{k[1]} / prompt {k[2]}: {faces} of {n} images with a face" for k, faces, n, v in rows if v is None]
            entry = {
                self.name: float(np.mean(values)) if values else None,
                "face_div_groups": len(rows),
                "face_div_na": len(na),
                "face_div_na_groups": na,
            }
            if not values:
                entry[f"{self.name}_note"] = f"n/a ({len(na)} of {len(rows)} prompts with < 2 face images)"
            out[name] = entry
        return out

    def settings(self):
        return {"face_div_size": self.scorer.size, "detector": str(self.scorer.detector.model_file)}


@register
class FaceSim(ScorerMetric):
    """Face-Sim: cosine of ArcFace embeddings of the generated face and the identity's reference faces
    (`face_sim.FaceSimScorer`); an image without a face scores 0 (no_face="zero") or is left out ("skip")."""

    name, title, axis_label = "face_sim", "Face-Sim", "Face-Sim (ArcFace cosine)"
    digits, card_digits = 4, 3
    found_key, missing_key, missing_label, missing_title = "face_found", "no_face", "no face", "No face detected"
    requires = {
        "face_detector": "an insightface folder with an SCRFD detector: --face-models / config.eval.face_detector",
        "arcface": "a converted ArcFace folder: --arcface / config.eval.arcface",
    }

    @classmethod
    def from_options(cls, options):
        from persongen_jax.evaluation.face_sim import FaceSimScorer

        return cls(
            FaceSimScorer.from_pretrained(
                options["face_detector"],
                options["arcface"],
                no_face=options.get("no_face") or "zero",
                select=options.get("face_select") or "largest",
                **_face_options(options),
            )
        )

    def prepare_references(self, images, names):
        return self.scorer.reference_embeddings(images, names)

    def __call__(self, images, prompts, references):
        values, found = self.scorer(images, references)
        return MetricResult(list(values), [bool(f) for f in found])

    def warm_up(self):  # ArcFace; the detector is onnxruntime (nothing to compile)
        s = self.scorer.crop_size
        self.scorer.embed_crops(np.zeros((1, s, s, 3), np.uint8))

    def settings(self):
        det = self.scorer.detector
        return {
            "no_face": self.scorer.no_face,
            "face_select": self.scorer.select,
            "det_thresh": det.det_thresh,
            "det_size": list(det.det_size),
            "detector": str(det.model_file),
        }
