#!/usr/bin/env bash
# Download, into .whl/, the wheels bench/gpu_run.sh installs on the GPU machine: the packages
# genq's worker code needs that the H200 image lacks (diffusers, pydantic and its parts,
# pydantic-settings and its parts), at the versions this venv runs, built for the machine's
# Python 3.12 on x86-64. The folder is git-ignored; the device tool carries it (`carry: [".whl"]`).
#
#     bash bench/gpu_wheels.sh        # here, where PyPI is reachable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
for name in diffusers pydantic pydantic-core pydantic-settings annotated-types \
    typing-inspection python-dotenv importlib-metadata typing-extensions; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$(version "$name")"
done
ls -1 .whl
du -sh .whl
