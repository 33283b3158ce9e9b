"""Benchmark `loratool merge` against PEFT's merge_and_unload and a plain `cp -r` of the base (issue 4).

Builds (once, cached under --work) a synthetic ~1.1B-parameter Llama (TinyLlama shapes: hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 key/value heads, vocab 32000), random bf16 weights with a fixed
seed, saved as a sharded Hugging Face folder, and a rank-16 PEFT adapter (float32, alpha 32, random
non-zero A and B) on all seven projections. Then times, alternately and as whole processes:

  cp        cp -r base out                                   (the I/O floor)
  cp + sync cp -r base out && sync out/*                     (the durable floor: loratool fsyncs by default)
  loratool  python -m loratool merge base adapter -o out     (default: fsync; and --no-fsync, as cp)
  peft      load bf16 model, PeftModel.from_pretrained, merge_and_unload, save_pretrained

Peak RSS per process comes from /usr/bin/time -f %M. Finally the loratool output is compared with
PEFT's, element by element: the distance in bf16 ulp and the fraction of identical elements.

    flock /tmp/loratool-bench.lock /work/venv/bin/python benchmarks/merge.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
CFG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def build(work: Path, shard_bytes: int = 500_000_000) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (base / "model.safetensors.index.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    cfg = LlamaConfig(**CFG, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size = {}, {}, 0
    names = []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(base / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    total = 0
    for k, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) if not k.endswith("norm.weight") \
            else torch.ones(shape, dtype=torch.bfloat16)
        nb = t.numel() * 2
        if size + nb > shard_bytes:
            flush()
        shard[k] = t
        size += nb
        total += nb
    flush()
    # Name shards like transformers does (model-0000i-of-0000N.safetensors).
    final = {}
    for i, name in enumerate(names):
        new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(base / name, base / new)
        final[name] = new
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(base)
    # The PEFT adapter: exactly what PeftModel.save_pretrained writes for these modules.
    lora = {}
    for k, shape in shapes.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[-2] in PROJ:
            module = k[: -len(".weight")]
            out_f, in_f = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f ** 0.5
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": PROJ, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": None, "inference_mode": True}, indent=2))
    return base, adapter


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""


def timed(cmd: list[str], env=None) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds user + system) of one whole process, from /usr/bin/time."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss, user, sys_ = r.stderr.strip().splitlines()[-1].split()
    return wall, int(rss) * 1024, float(user) + float(sys_)


def agreement(a: Path, b: Path) -> dict:
    """Element-wise agreement of two safetensors folders (loratool's and PEFT's merge), one tensor at a time:
    tensors compared, elements, identical elements, the largest distance in ulp of the tensors' dtype."""
    import numpy as np
    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ulp import ulp_distance

    def where(folder):
        idx = folder / "model.safetensors.index.json"
        if idx.is_file():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        return {k: folder / "model.safetensors" for k in safe_open(str(folder / "model.safetensors"), "pt").keys()}

    wa, wb = where(a), where(b)
    common = sorted(set(wa) & set(wb))
    n = same = worst = 0
    for k in common:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            d = ulp_distance(fa.get_tensor(k), fb.get_tensor(k))
        n += d.size
        same += int((d == 0).sum())
        worst = max(worst, int(d.max()) if d.size else 0)
    missing = sorted(set(wa) ^ set(wb))
    if missing:
        print(f"keys in only one output: {missing[:5]}", file=sys.stderr)
    return {"tensors_compared": len(common), "elements": n, "identical": same,
            "identical_fraction": round(same / max(n, 1), 7), "max_ulp": worst, "keys_in_one_only": len(missing)}


def kernel() -> dict:
    """Per-element cost of each step of one merged block (single thread, min of 5 passes over a 5632 x 2048
    bf16 target in 1 MiB float32 blocks), and the start-up cost of `import torch` that the CPU route avoids."""
    import ml_dtypes
    import numpy as np

    from loratool import dtypes
    from loratool.device import blas_threads

    g = np.random.default_rng(0)
    R, C, rows = 5632, 2048, (1 << 20) // (2048 * 4)
    B = (g.standard_normal((R, 16)) * 0.01).astype(np.float32)
    A = (g.standard_normal((16, C)) / 45).astype(np.float32)
    W = (g.standard_normal((R, C)) * 0.02).astype(ml_dtypes.bfloat16)
    X, D = (np.empty((rows, C), np.float32) for _ in range(2))
    O = np.empty((rows, C), ml_dtypes.bfloat16)
    steps = {"bf16->f32": lambda i: np.copyto(X, W[i:i + rows], casting="unsafe"),
             "B@A (r=16, numpy)": lambda i: np.matmul(B[i:i + rows], A, out=D),
             "scale": lambda i: np.multiply(D, np.float32(0.37), out=D), "add": lambda i: np.add(X, D, out=X),
             "range check": lambda i: dtypes.out_of_range(X, "BF16"),
             "f32->bf16 (ml_dtypes)": lambda i: dtypes.cast(X, "BF16", O)}
    best = dict.fromkeys(steps, float("inf"))
    with blas_threads(1):
        for _ in range(5):
            acc = dict.fromkeys(steps, 0.0)
            for i in range(0, R - rows + 1, rows):
                for name, fn in steps.items():
                    t = time.perf_counter()
                    fn(i)
                    acc[name] += time.perf_counter() - t
            best = {k: min(best[k], acc[k]) for k in steps}
    n = (R // rows) * rows * C
    ns = {k: round(v / n * 1e9, 3) for k, v in best.items()}

    def start(code):
        t = time.perf_counter()
        subprocess.run([PY, "-c", code], check=True)
        return time.perf_counter() - t

    empty = min(start("pass") for _ in range(3))
    imp = min(start("import torch") for _ in range(3)) - empty
    return {"ns_per_element": ns, "total_ns_per_element": round(sum(ns.values()), 3),
            "import_torch_s": round(imp, 2), "load_avg": os.getloadavg()[0]}


def big_adapter(work: Path, base: Path, rank: int = 320) -> dict:
    """Peak RSS of merging a ~1 GB adapter (float32, rank `rank` on the seven projections of every layer, built
    once with numpy and written by loratool's PEFT writer) into the base: what the merge holds beyond the
    adapter itself."""
    import numpy as np

    import loratool
    from loratool.adapter import Adapter, whole_target
    from loratool.io.base import open_base

    adapter = work / f"adapter-r{rank}"
    if not (adapter / "adapter_config.json").is_file():
        g = np.random.default_rng(0)
        targets = []
        with open_base(base) as b:
            for k in b.keys():
                if k.endswith("proj.weight"):
                    (o, i), _ = b.info(k)
                    A = (g.standard_normal((rank, i), dtype=np.float32) / np.sqrt(i)).astype(np.float32)
                    B = (g.standard_normal((o, rank), dtype=np.float32) * 1e-3).astype(np.float32)
                    targets.append(whole_target(k, "linear", (o, i), A, B, 2 * rank))
        loratool.save(Adapter({t.key: t for t in targets}), adapter, to="peft")
    out = work / "out-big"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, cpu = timed([PY, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out), "-q",
                            "--no-fsync"])
    shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in adapter.iterdir())
    return {"adapter_bytes": size, "rank": rank, "wall_s": round(wall, 2), "peak_rss_bytes": rss,
            "peak_rss_gb": round(rss / 1e9, 3), "load_avg": os.getloadavg()[0]}


def phases(base: Path, adapter: Path, out: Path) -> dict:
    """One `loratool merge --no-fsync --json` in a fresh process: its own phase times (seconds since
    run_merge started), the route it took, and the process's wall, CPU and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"])
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", PY, "-m", "loratool", "merge", str(base), str(adapter),
                        "-o", str(out), "--no-fsync", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    rss, user, sys_ = r.stderr.strip().splitlines()[-1].split()
    s = json.loads(r.stdout)
    return {"device": s["device"], "phases_s": s["phases"], "process_wall_s": round(wall, 2),
            "user_s": float(user), "system_s": float(sys_), "peak_rss_gib": round(int(rss) / 2**20, 3),
            "load_avg": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/loratool-bench/merge")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peft-rounds", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--kernel", action="store_true", help="only measure the per-element cost of a merged block")
    ap.add_argument("--phases", action="store_true", help="only time the phases of one merge (wall and CPU)")
    ap.add_argument("--big-adapter", action="store_true", help="only the peak RSS of merging a ~1 GB adapter")
    args = ap.parse_args()
    if args.kernel:
        print(json.dumps(kernel(), indent=2))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base, adapter = build(work)
    print(f"base ready in {time.perf_counter() - t:.1f} s: {base}", file=sys.stderr)
    if args.phases:
        print(json.dumps(phases(base, adapter, work / "out"), indent=2))
        return
    if args.big_adapter:
        print(json.dumps(big_adapter(work, base), indent=2))
        return
    size = sum(p.stat().st_size for p in base.iterdir())
    out = work / "out"
    runs = {"cp": [], "cp + sync": [], "loratool": [], "loratool --no-fsync": [], "peft": []}
    cmds = {
        "cp": ["cp", "-r", str(base), str(out)],
        # The durable floor for loratool's default, which fsyncs its output before the rename.
        "cp + sync": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(base), str(out)],
        "loratool": [PY, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out), "-q"],
        "loratool --no-fsync": [PY, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out), "-q",
                                "--no-fsync"],
        "peft": [PY, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
    }
    subprocess.run(["sync"])
    for r in range(args.rounds):
        for name in runs:
            if name == "peft" and r >= args.peft_rounds:
                continue
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])  # every run starts with no dirty pages from the previous one
            wall, rss, cpu = timed(cmds[name])
            runs[name].append((wall, rss, cpu))
            print(f"round {r + 1} {name:22s} {wall:7.2f} s  CPU {cpu:6.2f} s  peak RSS {rss / 2**30:.2f} GiB  "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
            if name == "loratool --no-fsync" and r == 0:
                shutil.rmtree(work / "out-loratool", ignore_errors=True)
                os.replace(out, work / "out-loratool")
            elif name == "peft" and r == 0:
                shutil.rmtree(work / "out-peft", ignore_errors=True)
                os.replace(out, work / "out-peft")
    shutil.rmtree(out, ignore_errors=True)
    cp = statistics.median(w for w, _, _ in runs["cp"])
    res = {"base_bytes": size, "rounds": args.rounds, "cpus": os.cpu_count(),
           "load_avg_at_end": os.getloadavg()[0],
           "against_peft": agreement(work / "out-loratool", work / "out-peft")}
    for name, rs in runs.items():
        med = statistics.median(w for w, _, _ in rs)
        res[name] = {"median_s": round(med, 2), "all_s": [round(w, 2) for w, _, _ in rs],
                     "cpu_s": [round(c, 2) for _, _, c in rs],
                     "peak_rss_gib": round(max(m for _, m, _ in rs) / 2**30, 3), "x_cp": round(med / cp, 2)}
    res["peft_over_loratool"] = round(res["peft"]["median_s"] / res["loratool --no-fsync"]["median_s"], 2)
    # Each loratool run against the cp run of the same round (they alternate), which cancels slow drifts.
    for name, ref in (("loratool", "cp + sync"), ("loratool --no-fsync", "cp")):
        res[name]["x_" + ref.replace(" + ", "_")] = round(res[name]["median_s"] / res[ref]["median_s"], 2)
        res[name]["paired_ratios"] = [round(w / c, 2) for (w, _, _), (c, _, _) in zip(runs[name], runs[ref])]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
