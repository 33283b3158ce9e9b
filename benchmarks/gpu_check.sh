#!/usr/bin/env bash
# The device checks of merge (issue 4) and extract (issue 6), as the one prepared run for a machine with a
# GPU. Run from the repository root with the machine's own python3 (torch, safetensors, numpy, click, rich,
# pytest, hypothesis, peft, transformers, lycoris-lora: nothing is installed). Each step writes its log under $OUT (the
# device tool's folder; /tmp/loratool-gpu elsewhere) as it finishes, so a run cut short keeps what it did:
#   1. device.txt        the card's name, torch's and numpy's versions
#   2. gpu-tests.log     the tests marked gpu: CUDA agrees with the CPU (extract's factors, merge's bytes; LyCORIS
#                        kinds, DoRA, fused experts and float8 bases through tests/test_device_kinds.py)
#   3. extract-set.json  the 8B-shaped set (224 matrices) through the randomized SVD at rank 16, one by one,
#                        compute time only (issue 6's bar: under 2 s)
#   4. e2e-*.json        (E2E=1, the default) extract of the merge benchmark's 1.1B pair, whole processes,
#                        --device cuda and the CPU route, one round each, beside `cp -r`
#   5. fp8-*.json        (FP8=1, the default) merge of the merge benchmark's adapter into an FP8 copy of its
#                        1.1B model (block-scaled, every projection requantized), --device cuda and the CPU
#                        route, one round each, beside `cp -r`
# Dry run without a GPU: DEVICE=cpu LAYERS=1 E2E=0 bash benchmarks/gpu_check.sh
# What the machine's image lacks (array-api-compat, lycoris-lora, toml) comes as wheels in .whl/, written here by
# benchmarks/gpu_wheels.sh and carried with the run; they are installed into /tmp/site first.
set -uo pipefail
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
out=${OUT:-/tmp/loratool-gpu}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

python3 -c 'import numpy, torch
print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")' 2>&1 | tee "$out/device.txt"

python3 -m pytest -m gpu -rs tests/test_merge.py tests/test_extract.py tests/test_device_kinds.py 2>&1 \
    | tee "$out/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python3 benchmarks/extract.py --set "$device" --layers "${LAYERS:-32}" --json "$out/extract-set.json" \
    > "$out/extract-set.log" 2>&1 || status=1
tail -n 20 "$out/extract-set.log"

if [ "${E2E:-1}" = 1 ]; then
    for d in "$device" cpu; do
        python3 benchmarks/extract.py --e2e --rounds 1 --e2e-device "$d" --json "$out/e2e-$d.json" \
            > "$out/e2e-$d.log" 2>&1 || status=1
        tail -n 30 "$out/e2e-$d.log"
    done
fi
if [ "${FP8:-1}" = 1 ]; then
    bench=/tmp/loratool-bench/merge
    python3 benchmarks/fp8.py --work "$bench" --make auto > "$out/fp8-make.log" 2>&1 || status=1
    for d in "$device" cpu; do
        python3 benchmarks/fp8.py --work "$bench" --adapter "$bench/adapter" --rounds 1 --device "$d" \
            > "$out/fp8-$d.json" 2> "$out/fp8-$d.log" || status=1
        cat "$out/fp8-$d.json"
    done
fi
exit "$status"
