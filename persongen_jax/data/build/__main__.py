"""`python -m persongen_jax.data.build SRC DST [options] [-- beam pipeline options]` (see docs/DATASET.md).

Everything after `--` goes to Beam unchanged: `--runner` (DirectRunner when absent), `--direct_num_workers 2
--direct_running_mode multi_processing`, or a cluster runner's flags (Dataflow, Flink, Spark).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from persongen_jax.conditions import CLASS_WORDS
from persongen_jax.data.build.settings import CAPTION_BACKENDS, FACE_MASKS, BuildSettings, ModelSpec
from persongen_jax.data.format import DEFAULT_CAPTION_FIELDS, DEFAULT_TRIGGER_WORD, MAX_FILE_BYTES


def parser() -> argparse.ArgumentParser:
    """The command line (`python -m persongen_jax.data.build --help`); defaults from BuildSettings."""
    d = BuildSettings.__dataclass_fields__
    default = lambda name: d[name].default  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m persongen_jax.data.build",
                                description="Build a training dataset from SRC/persons/<person_id>/<image> on Apache "
                                            "Beam. Options after `--` go to Beam.")
    p.add_argument("src", help="folder (or Beam filesystem URL: gs://, s3://) holding persons/<person_id>/<image>")
    p.add_argument("dst", help="output dataset folder (local or mounted); its _work/ holds the stage caches")
    g = p.add_argument_group("face models")
    g.add_argument("--detector", required=True, help="insightface model folder (antelopev2, buffalo_l) or SCRFD .onnx")
    g.add_argument("--arcface", required=True, help="ArcFace IResNet folder (`python -m weights_conversion arcface`)")
    g.add_argument("--det-size", type=int, default=default("det_size"), help="detector input side (default %(default)s)")
    g.add_argument("--det-thresh", type=float, default=default("det_thresh"))
    g.add_argument("--detector-threads", type=int, default=default("detector_threads"),
                   help="onnxruntime threads per worker process (0: one per core; with N workers on C cores, C/N)")
    g.add_argument("--embed-batch-size", type=int, default=default("embed_batch_size"))
    g = p.add_argument_group("filters")
    g.add_argument("--min-side", type=int, default=default("min_side"), help="shorter image side (default %(default)s)")
    g.add_argument("--min-face", type=int, default=default("min_face"),
                   help="both sides of the face box (default %(default)s)")
    g.add_argument("--verify-threshold", type=float, default=default("verify_threshold"),
                   help="ArcFace cosine at which two faces are the same person (default %(default)s)")
    g.add_argument("--verify-min-samples", type=int, default=default("verify_min_samples"),
                   help="DBSCAN min_samples of the identity clustering (default %(default)s)")
    g.add_argument("--min-images", type=int, default=default("min_images"),
                   help="a person needs this many verified images (default %(default)s)")
    g.add_argument("--max-file-mb", type=float, default=MAX_FILE_BYTES / 2**20)
    g = p.add_argument_group("crop")
    g.add_argument("--resolution", type=int, default=default("resolution"), help="crop side in pixels (default %(default)s)")
    g.add_argument("--crop-scale", type=float, default=default("crop_scale"),
                   help="0: the largest square of the image around the face; s > 0: s x the face size")
    g.add_argument("--face-mask", choices=FACE_MASKS, default=default("face_mask"))
    g.add_argument("--jpeg-quality", type=int, default=default("jpeg_quality"))
    for what in ("caption", "split"):
        g = p.add_argument_group(f"{what} model" + (" (default: the caption model)" if what == "split" else ""))
        g.add_argument(f"--{what}-backend", choices=CAPTION_BACKENDS, default="transformers" if what == "caption" else None)
        g.add_argument(f"--{what}-model", help="local model folder (transformers) or served model name (openai)")
        g.add_argument(f"--{what}-endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
        g.add_argument(f"--{what}-prompt", type=Path, help="prompt file (default: the packaged prompts/%s.txt)" % what)
        g.add_argument(f"--{what}-max-tokens", type=int, default=256)
        g.add_argument(f"--{what}-batch-size", type=int, default=8)
        g.add_argument(f"--{what}-concurrency", type=int, default=8, help="openai: requests in flight per worker")
        g.add_argument(f"--{what}-retries", type=int, default=3)
        g.add_argument(f"--{what}-timeout", type=float, default=300.0,
                       help="openai: seconds one request may take as a whole, connect to last byte "
                            "(default %(default)s)")
    p.add_argument("--caption-max-chars", type=int, default=default("caption_max_chars"),
                   help="a longer caption is rejected for its image (default %(default)s)")
    p.add_argument("--split-fields", default=",".join(DEFAULT_CAPTION_FIELDS),
                   help="comma-separated captions fields the split fills: the `source` of each text condition "
                        "(persongen_jax/conditions.py); the split prompt asks for each as the JSON key after "
                        "'caption_' (caption_bg -> \"bg\"). Default: %(default)s")
    p.add_argument("--caption-accelerator",
                   help="Beam resource hint for the caption/split stages, e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'")
    g = p.add_argument_group("captions and output")
    g.add_argument("--class-words", default=",".join(CLASS_WORDS), help="comma-separated (default %(default)s)")
    g.add_argument("--trigger-word", default=DEFAULT_TRIGGER_WORD)
    g.add_argument("--num-shards", type=int, default=default("num_shards"),
                   help="0: one shard per bundle, streamed (default); N: exactly N (costs a shuffle)")
    g.add_argument("--progress-every", type=float, default=default("progress_every_s"),
                   help="seconds between progress lines per worker (0: none)")
    return p


def _spec(a, what: str, fallback: ModelSpec | None = None) -> ModelSpec:
    get = lambda k: getattr(a, f"{what}_{k}")  # noqa: E731
    if fallback is not None and get("backend") is None:
        backend, model, endpoint = fallback.backend, get("model") or fallback.model, get("endpoint") or fallback.endpoint
    else:
        backend, model, endpoint = get("backend") or "transformers", get("model"), get("endpoint")
    return ModelSpec(backend=backend, model=model or "", endpoint=endpoint, max_new_tokens=get("max_tokens"),
                     timeout_s=get("timeout"), retries=get("retries"), concurrency=get("concurrency"),
                     batch_size=get("batch_size"))


def _prompt(path: Path | None, name: str) -> dict:
    if path is None:
        return {}
    try:
        return {f"{name}_prompt": path.read_text()}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--{name}-prompt {path}: cannot read it ({type(e).__name__})") from None


def settings_from_args(a) -> BuildSettings:
    """Parsed arguments -> BuildSettings (prompt files read here; ValueError naming an unreadable one)."""
    caption = _spec(a, "caption")
    return BuildSettings(
        src=a.src, dst=a.dst, detector=a.detector, arcface=a.arcface, caption=caption, split=_spec(a, "split", caption),
        **_prompt(a.caption_prompt, "caption"), **_prompt(a.split_prompt, "split"),
        split_fields=tuple(f.strip() for f in a.split_fields.split(",") if f.strip()),
        min_side=a.min_side, min_face=a.min_face, det_size=a.det_size, det_thresh=a.det_thresh,
        detector_threads=a.detector_threads,
        verify_threshold=a.verify_threshold, verify_min_samples=a.verify_min_samples, min_images=a.min_images,
        embed_batch_size=a.embed_batch_size, resolution=a.resolution, crop_scale=a.crop_scale, face_mask=a.face_mask,
        jpeg_quality=a.jpeg_quality, caption_max_chars=a.caption_max_chars,
        class_words=tuple(w.strip() for w in a.class_words.split(",") if w.strip()),
        trigger_word=a.trigger_word, num_shards=a.num_shards, max_file_bytes=int(a.max_file_mb * 2**20),
        caption_accelerator=a.caption_accelerator, progress_every_s=a.progress_every)


def main(argv=None) -> int:
    """The CLI: our options before `--`, Beam's after; 0 on success, 1 with one `error:` line otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    a = parser().parse_args(ours)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from persongen_jax.data.build.pipeline import build_dataset

    try:
        build_dataset(settings_from_args(a), beam_args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
