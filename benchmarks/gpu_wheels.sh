#!/usr/bin/env bash
# The Python packages loratool and its GPU tests need that the device machine's image lacks (array-api-compat;
# lycoris-lora and its toml for the LyCORIS device tests), downloaded here as wheels for that machine's
# Python 3.12 into .whl/ (ignored by git). Carry the folder with the run (`carry: [".whl"]`); gpu_check.sh
# installs whatever it finds there into /tmp/site before its first step. The versions are this checkout's.
set -euo pipefail
py=${PYTHON:-python3}
version() { "$py" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
rm -rf .whl && mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "array-api-compat==$(version array-api-compat)" "lycoris-lora==$(version lycoris-lora)" "toml==$(version toml)"
ls .whl
