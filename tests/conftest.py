import os

# Tests run on the CPU; 4 fake devices let data-parallel code be tested without GPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

# Parity tests compare against fp32 PyTorch: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
