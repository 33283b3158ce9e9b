"""Merging into an FP8 base (issue 14): a block-scaled float8 copy of a bf16 model, merged against `cp -r` of it.

make   `--make SRC` writes WORK/base-fp8 from a bf16 Hugging Face folder (sharded or not): every 2-D projection
       weight of the decoder layers (q/k/v/o, gate/up/down) becomes float8_e4m3fn with float32
       `weight_scale_inv` per 128 x 128 block, quantized as transformers' Fp8Quantize does (ops/fp8.quantize);
       embeddings, norms and the head stay bf16, as in DeepSeek-V3 and Qwen3 FP8 checkpoints. config.json gains
       `quantization_config` {quant_method fp8, weight_block_size [128, 128]}. One shard in memory at a time.
qv     `--make-qv SRC` writes WORK/adapter-qv: the PEFT adapter SRC on q_proj and v_proj only (PEFT's default
       targets for Llama), the case where most of the model's bytes are copied and a tenth are requantized.
check  `--check-encoder` compares ops.fp8.encode with ml_dtypes' cast on every float32 below 464, both signs.
bench  alternately, as whole processes after a `sync`: `cp -r base-fp8 out` and `python -m loratool merge
       base-fp8 ADAPTER -o out --no-fsync -q` (the float8 scheme kept: dequantize, merge, requantize), and with
       `--dequantized` also `... --dtype bfloat16`. Wall seconds, peak RSS and CPU from wait4; medians and
       their ratio.

    python benchmarks/fp8.py --work /tmp/loratool-bench/merge --make /tmp/loratool-bench/merge/base
    python benchmarks/fp8.py --work /tmp/loratool-bench/merge --adapter /tmp/loratool-bench/merge/adapter --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROJ = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
BLOCK = (128, 128)


def make(src: Path, dst: Path) -> None:
    import numpy as np

    from loratool.container import read_arrays, read_header, write_file
    from loratool.ops import fp8

    scheme = fp8.Scheme("block", "", "F32", BLOCK)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index_path = src / "model.safetensors.index.json"
    files = sorted({v for v in json.loads(index_path.read_text())["weight_map"].values()}) if index_path.exists() \
        else ["model.safetensors"]
    weight_map, total = {}, 0
    for name in files:
        hdr = read_header(src / name)
        out = {}
        for key, x in read_arrays(src / name, hdr).items():
            if PROJ.search(key):
                q, s = fp8.quantize(np.asarray(x, dtype=np.float32), scheme)
                out[key], out[key + "_scale_inv"] = q, s
            else:
                out[key] = x
        write_file(tmp / name, out, dict(hdr.metadata))
        for k, v in out.items():
            weight_map[k] = name
            total += v.nbytes
        print(f"fp8: wrote {name}", file=sys.stderr, flush=True)
    if index_path.exists():
        (tmp / index_path.name).write_text(json.dumps({"metadata": {"total_size": total},
                                                       "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def make_qv(src: Path, dst: Path) -> None:
    from loratool.container import read_arrays, read_header, write_file

    hdr = read_header(src / "adapter_model.safetensors")
    keep = {k: v for k, v in read_arrays(src / "adapter_model.safetensors", hdr).items()
            if re.search(r"\.(q|v)_proj\.", k)}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_file(tmp / "adapter_model.safetensors", keep, dict(hdr.metadata))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    print(f"fp8: wrote {dst} ({len(keep) // 2} modules)")


def check_encoder() -> dict:
    """ops.fp8.encode against ml_dtypes on every float32 bit pattern from 0 to 464 (exclusive), and negated;
    then both timed on what a merge encodes: 128 x 512 chunks of Gaussian weights scaled to amax 448."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from loratool.ops import fp8

    end, step, bad, n = 0x43E80000, 1 << 24, 0, 0
    for a in range(0, end, step):
        y = np.arange(a, min(end, a + step), dtype=np.uint32).view(np.float32)
        for sign in (1, -1):
            ys = y * np.float32(sign)
            codes, _ = fp8.encode(ys.copy())
            bad += int(np.count_nonzero(codes.view(np.uint8) != ys.astype(fp8.E4M3).view(np.uint8)))
            n += ys.size
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((128, 512)).astype(np.float32) for _ in range(8)]
    chunks = [c * np.float32(448 / np.abs(c).max()) for c in chunks]
    times = {"encode": [], "ml_dtypes": []}
    with threadpool_limits(1):
        for _ in range(5):
            for name, fn in (("encode", lambda c: fp8.encode(c.copy())), ("ml_dtypes", lambda c: c.astype(fp8.E4M3))):
                t = time.perf_counter()
                for _ in range(25):
                    for c in chunks:
                        fn(c)
                times[name].append((time.perf_counter() - t) / (25 * 8 * 128 * 512) * 1e9)
    return {"values": n, "mismatches": bad, **{f"{k}_ns_per_element": round(statistics.median(v), 2)
                                               for k, v in times.items()}}


def run(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS (MiB) and CPU seconds of one whole process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fp8: {' '.join(cmd[:6])} ... failed:\n{err.decode()[-3000:]}")
    return {"s": round(wall, 2), "rss_mib": round(ru.ru_maxrss / 1024), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2)}


def bench(work: Path, adapter: Path, rounds: int, dequantized: bool, device: str = "cpu") -> dict:
    base, out = work / "base-fp8", work / "out-fp8"
    lt = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out), "--no-fsync", "-q",
          "--device", device]
    cases = {"cp -r": ["cp", "-r", str(base), str(out)], "merge (fp8 kept)": lt}
    if dequantized:
        cases["merge --dtype bfloat16"] = [*lt, "--dtype", "bfloat16"]
    res = {k: [] for k in cases}
    for _ in range(rounds):
        for name, cmd in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            res[name].append(run(cmd))
    shutil.rmtree(out, ignore_errors=True)
    cp = statistics.median(r["s"] for r in res["cp -r"])
    doc = {"load": os.getloadavg()[0], "device": device, "bytes": sum(f.stat().st_size for f in base.iterdir()),
           "cases": {}}
    for name, runs in res.items():
        med = statistics.median(r["s"] for r in runs)
        doc["cases"][name] = {"median_s": med, "ratio_to_cp": round(med / cp, 2), "runs": runs,
                              "peak_rss_mib": max(r["rss_mib"] for r in runs)}
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench/merge"))
    ap.add_argument("--make", type=Path, help="a bf16 Hugging Face folder to write WORK/base-fp8 from; `auto`: "
                    "the merge benchmark's 1.1B model in WORK/base (built there if missing, with its adapter)")
    ap.add_argument("--device", default="cpu", help="pass --device to the merges (cuda: the float8 path on the GPU)")
    ap.add_argument("--adapter", type=Path, help="the adapter to merge (a PEFT folder)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dequantized", action="store_true", help="also time --dtype bfloat16")
    ap.add_argument("--make-qv", type=Path, help="a PEFT adapter to write WORK/adapter-qv from")
    ap.add_argument("--check-encoder", action="store_true", help="ops.fp8.encode against ml_dtypes, exhaustively")
    a = ap.parse_args()
    if a.check_encoder:
        print(json.dumps(check_encoder()))
    if a.make == Path("auto"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import merge  # the merge benchmark's model builder

        a.make, _ = merge.build(a.work)
    if a.make:
        make(a.make, a.work / "base-fp8")
    if a.make_qv:
        make_qv(a.make_qv, a.work / "adapter-qv")
    if a.adapter:
        print(json.dumps(bench(a.work, a.adapter, a.rounds, a.dequantized, a.device), indent=2))


if __name__ == "__main__":
    main()
