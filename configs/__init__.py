"""Experiment configs (ml_collections): `get_config(arg)` per file, one file per research experiment.

`default` holds every key with its comment; `baseline` is the research's baseline; the other experiments
import it (or the experiment they extend) and state only their difference. Each file's docstring has its
launch command. `FILE.py:tiny` is the laptop-sized variant of every experiment (a tiny random model,
synthetic data, 2 steps: `default.tiny`), e.g.

    python -m persongen_jax.train --config configs/baseline.py:tiny --workdir /tmp/baseline

Load one as the train CLI does: `persongen_jax.train.load_config("configs/X.py")`.
"""
