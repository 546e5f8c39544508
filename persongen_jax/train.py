"""`python -m persongen_jax.train --config configs/X.py --workdir W [--config.key=value ...]`

Parses flags and calls `train_and_evaluate(config, workdir)`. Without --config: configs/demo.py.
An override of an unknown key fails naming the key (ml_collections config_flags); bad input found later
(a value of the wrong type, a missing dataset, a resume with an incompatible config, a run folder in use,
no restorable checkpoint) is one `error:` line and exit 1.
"""

from __future__ import annotations

import logging as pylogging
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "ml_collections config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tb/", required=True)


def load_config(spec: str):
    """A config as `--config SPEC` gives it: "configs/final_method.py" or "configs/final_method.py:tiny"
    (the file's `get_config(arg)`), through ml_collections' own config-file parser."""
    # The class DEFINE_config_file parses `--config` with (not re-exported by config_flags/__init__).
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return ConfigFileFlagParser(name="config").parse(spec)


class _QuietOrbax(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax logs every save step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from persongen_jax.training import train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input (config, data, run folder, checkpoint) and a NaN loss: one line naming the file / key.
        # --verbosity=1 logs the traceback too.
        logging.debug("traceback of the error below", exc_info=True)
        message = " ".join(str(e).split("\n")[0].split()) if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
