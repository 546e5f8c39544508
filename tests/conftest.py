import os
import tempfile

# Tests run on the CPU; 4 fake devices let data-parallel code be tested without GPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny, so their time goes to compiling, not running: LLVM's -O0 and no expensive
# LLVM passes cut XLA:CPU's compile time by ~40% (tests/test_scale_features.py's remat test: 44 -> 25 s
# of CPU). XLA's own HLO optimisations (fusion, layout, algebraic simplification) still run, and XLA:CPU
# never uses fast-math, so the numbers are the same IEEE float32 arithmetic the parity tests check.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
)
# One persistent compilation cache for this test session, shared with the CLI subprocesses the
# tests start (same program in several processes -> compiled once). Speed only: results are
# identical with or without it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="persongen-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

from persongen_jax.testing.torch_refs import install_torchvision_shim  # noqa: E402

install_torchvision_shim()  # transformers and the lpips / pytorch-fid references import torchvision

# Parity tests compare against fp32 PyTorch: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
