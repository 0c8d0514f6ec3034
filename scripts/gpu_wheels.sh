#!/usr/bin/env bash
# Run HERE (a machine with pip access), before using the lent GPU machine: fetches the wheels of
# what its image lacks (zarr and its codecs, Hydra) for CPython 3.12 x86-64 into .whl/ (ignored by
# git; name it in the device call's `carry`). scripts/gpu_checks.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
pip_download zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0 \
             hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (what omegaconf needs) is published as a source archive only; it is
# pure Python, so a wheel built here installs anywhere.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
du -sh .whl
