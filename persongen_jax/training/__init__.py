"""Training (DESIGN points 5-6): model assembly, loss, optimizer groups, sharding, checkpoints, the loop.

python -m persongen_jax.train --config configs/demo.py --workdir /tmp/demo
"""

from persongen_jax.training.train_loop import train_and_evaluate  # noqa: F401
