"""Training config files as the command-line tools read them (`train --config`, `evaluate --config`, the
app's --tiny): by path, through ml_collections' own parser. The library itself never imports `configs/`
(a run's config is read from its folder: `training.run_folder.read_config`)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # the parser of DEFINE_config_file

from persongen_jax.io import loads_json

# The embedded default: tiny random model on the demo dataset (train without --config, the app's --tiny).
DEMO_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo.py")


def check_config_file(spec: str) -> None:
    """ValueError naming `--config SPEC` when its file does not exist (ml_collections would only say
    "Failed loading config file config_config")."""
    path = Path(spec.split(":", 1)[0])
    if not path.is_file():
        raise ValueError(f"--config {spec}: no such file" + (" (a folder)" if path.is_dir() else ""))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A config as `--config SPEC` gives it: "configs/final_method.py" or "configs/final_method.py:tiny"
    (the file's `get_config(arg)`), or a run's config.json."""
    check_config_file(spec)
    if spec.endswith(".json"):
        try:
            return ml_collections.ConfigDict(loads_json(Path(spec).read_bytes(), spec))
        except (OSError, ValueError, TypeError) as e:  # TypeError: JSON that is not an object
            raise ValueError(f"--config {spec}: not a JSON config object ({type(e).__name__}: {e})") from None
    return ConfigFileFlagParser(name="config").parse(spec)
