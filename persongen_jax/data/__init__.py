"""ID dataset: on-disk format (ArrayRecord + index.json), grain training pipeline, demo-dataset maker.

    python -m persongen_jax.data.make_demo DIR                   # synthetic dataset, seconds on a CPU
    python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST   # your own persons/<id>/<img> tree
    python -m persongen_jax.data.build SRC DST --detector ... --arcface ... --caption-model ...
                                                                 # photos only: filter, verify, crop, caption (Beam)

    from persongen_jax.data import make_train_iterator, bad_records_report

See docs/DATASET.md.
"""

import importlib

# Names resolved lazily, so `python -m persongen_jax.data.format` does not import the module twice.
_EXPORTS = {
    "format": (
        "check_shards",
        "decode_record",
        "encode_record",
        "index_shards",
        "load_index",
        "read_records",
        "write_dataset",
    ),
    "pipeline": (
        "BATCH_KEYS",
        "BadRecords",
        "bad_records_report",
        "epochs_completed",
        "make_train_dataset",
        "make_train_iterator",
        "num_records",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"persongen_jax.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'persongen_jax.data' has no attribute {name!r}")
