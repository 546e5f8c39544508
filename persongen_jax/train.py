"""`python -m persongen_jax.train --config configs/X.py --workdir W [--config.key=value ...]`

Parses flags and calls `train_and_evaluate(config, workdir)`. Without --config: configs/demo.py. Also
installed as `persongen-train`. `--help` lists every config key with its value in the chosen config.

Every mistake on the command line is one `error:` line and exit 1, before anything is written: an unknown
config key (with ml_collections' "did you mean" hint), a missing config file, a value of the wrong type,
a --workdir that is a file. Bad input found later (a missing dataset, a resume with an incompatible config,
a run folder in use, no restorable checkpoint) is one `error:` line too; a run folder this start created
is removed again when the start fails before training (nothing left behind).
"""

from __future__ import annotations

import ast
import logging as pylogging
import re
import shutil
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from persongen_jax.cli.config import DEMO_CONFIG as _DEMO
from persongen_jax.cli.config import check_config_file, load_config  # noqa: F401 (`train.load_config`: tests)

_CONFIG = _WORKDIR = None  # the flags: defined by `parse_flags`
_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def _config_spec(argv) -> str:
    """The --config value of argv (default: configs/demo.py)."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
    return _DEMO


def _flat(config, prefix: str = ""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def help_text(argv) -> str:
    """`--help`: usage, the two flags, and every config key with its value in the chosen config."""
    spec = _config_spec(argv)
    config = load_config(spec)
    keys = "\n".join(f"  --config.{k}={v!r}" for k, v in _flat(config))
    return (
        f"usage: python -m persongen_jax.train [--config FILE.py[:ARG]] --workdir DIR [--config.KEY=VALUE ...]\n\n"
        f"{__doc__.split(chr(10) + chr(10), 1)[1]}\n"
        f"flags:\n  --config FILE.py[:ARG]  ml_collections config file; ARG goes to its get_config "
        f"(default: configs/demo.py)\n"
        f"  --workdir DIR           run folder: checkpoints/, metrics.jsonl, tb/, samples/ (required)\n\n"
        f"config keys of {spec} (override any with --config.KEY=VALUE; meanings: configs/default.py):\n{keys}\n"
    )


def _message(e: BaseException, argv=()) -> str:
    """One readable line of a flag-parsing error (ml_collections' key errors are escaped reprs); argv: to name
    the whole dotted key of an unknown one."""
    text = str(e)
    if text[:1] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if hint:
        wrong, right = hint.group(2), hint.group(1)
        given = [a.split("=", 1)[0].lstrip("-")[len("config.") :] for a in argv if a.lstrip("-").startswith("config.")]
        full = next((g for g in given if g == wrong or g.endswith("." + wrong)), wrong)
        return (
            f"unknown config key {full!r}: did you mean {full[: len(full) - len(wrong)] + right!r}? "
            "(--help lists the keys)"
        )
    if isinstance(e, (KeyError, AttributeError)):
        return f"unknown config key {text.splitlines()[0]} (--help lists the keys)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  "))]
    return " ".join((lines[0] if lines else type(e).__name__).split())


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
    """absl's flag parsing with `--help` (exit 0) and every mistake as one `error:` line (exit 1)."""
    if any(a in _HELP_FLAGS for a in argv[1:]):
        try:
            print(help_text(argv))
        except ValueError as e:
            _fail(_message(e))
        sys.exit(0)
    global _CONFIG, _WORKDIR
    try:
        check_config_file(_config_spec(argv))
        # Defined here, not at import: defining the config flag already applies the --config.KEY overrides of
        # sys.argv to the default config, and a typo there must be an error line too.
        _CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "ml_collections config file", lock_config=True)
        _WORKDIR = flags.DEFINE_string("workdir", None, "run folder", required=True)
        rest = flags.FLAGS(argv)
        _ = _CONFIG.value.keys()  # the file's errors surface on first access
    except Exception as e:  # noqa: BLE001 -- any parse failure is the user's input: one line
        _fail(_message(e, argv))
    workdir = Path(_WORKDIR.value)
    if workdir.exists() and not workdir.is_dir():
        _fail(f"--workdir {workdir}: is a file, not a folder")
    return rest


class _QuietOrbax(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def _started(workdir: Path) -> bool:
    """Whether a run got as far as training (metrics or a checkpoint written)."""
    ckpts = workdir / "checkpoints"
    return (workdir / "metrics.jsonl").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --config, --workdir, --config.KEY=VALUE)")
    logging.set_verbosity(logging.INFO)
    # orbax logs every save step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    # At INFO, JAX reports each platform plugin it probes and does not find ("Unable to initialize backend
    # 'tpu'" on a machine without one): expected, and the devices used are logged with the mesh.
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
    from persongen_jax.training import train_and_evaluate

    workdir = Path(_WORKDIR.value)
    created = not workdir.exists()
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input (config, data, run folder, checkpoint) and a NaN loss: one line naming the file / key.
        # --verbosity=1 logs the traceback too.
        logging.debug("traceback of the error below", exc_info=True)
        if created and workdir.is_dir() and not _started(workdir):
            shutil.rmtree(workdir, ignore_errors=True)  # this start made it and wrote nothing worth keeping
        message = " ".join(str(e).split("\n")[0].split()) if str(e) else type(e).__name__
        _fail(message)


def run() -> None:
    """The console script `persongen-train`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
