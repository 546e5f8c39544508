#!/bin/sh
# The wheels scripts/bench/device_suite.py needs on the lent GPU machine beyond its image (JAX 0.11,
# PyTorch 2.11, flax, optax, orbax, transformers, peft, ... preinstalled; no network there), downloaded here
# into .whl/ (git-ignored through .git/info/exclude) for Python 3.12 / x86-64. Run from the repo root.
set -e
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for w in diffusers==0.42.1 grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 tensorboardX==2.6.5 \
         importlib-metadata zipp portpicker; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$w"
done
ls -la .whl
