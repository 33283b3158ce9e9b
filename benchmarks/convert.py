"""Convert a Llama-7B-shaped PEFT adapter to loratool and back, as whole `loratool convert` processes.

Generates (seeded) a PEFT folder with r = 16 on q/k/v/o/gate/up/down of 32 layers (hidden 4096, intermediate
11008, 224 modules, bf16), with a rank_pattern and an alpha_pattern entry, then times

    loratool convert PEFT -o A.safetensors --to loratool
    loratool convert A.safetensors -o PEFT2 --to peft

and checks that every tensor of PEFT2 equals the original bit for bit and that the effective r and alpha of
every module agree. Prints one JSON line. Run serialised with the other benchmarks:

    flock /tmp/loratool-bench.lock python benchmarks/convert.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, R = 4096, 11008, 32, 16
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def make_peft(folder: Path, layers: int) -> int:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, (out, inp) in SHAPES.items():
            r = 8 if name == "self_attn.v_proj" else R  # rank_pattern below
            p = f"base_model.model.model.layers.{i}.{name}"
            tensors[p + ".lora_A.weight"] = (torch.randn(r, inp, generator=g) * 0.01).to(torch.bfloat16)
            tensors[p + ".lora_B.weight"] = (torch.randn(out, r, generator=g) * 0.01).to(torch.bfloat16)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 32, "use_rslora": False, "target_modules":
           sorted({n.split(".")[-1] for n in SHAPES}), "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 8},
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return sum(t.numel() for t in tensors.values())


def run(args) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loratool-convert-", dir=a.tmp))
    try:
        n = make_peft(work / "peft", a.layers)
        size = (work / "peft" / "adapter_model.safetensors").stat().st_size
        t1 = run(["convert", work / "peft", "-o", work / "a.safetensors", "--to", "loratool", "-q"])
        t2 = run(["convert", work / "a.safetensors", "-o", work / "peft2", "--to", "peft", "-q"])
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB (Linux)
        x, y = load_file(str(work / "peft" / "adapter_model.safetensors")), \
            load_file(str(work / "peft2" / "adapter_model.safetensors"))
        identical = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from loratool.io import peft as P

        p1, p2 = P.load(work / "peft"), P.load(work / "peft2")
        same_scales = all(p1.targets[k].blocks[0].rank == p2.targets[k].blocks[0].rank and
                          p1.targets[k].blocks[0].scale == p2.targets[k].blocks[0].scale for k in p1.targets)
        print(json.dumps({"modules": a.layers * len(SHAPES), "parameters": n, "peft_bytes": size,
                          "peft_to_loratool_s": round(t1, 2), "loratool_to_peft_s": round(t2, 2),
                          "peak_rss_mib": round(rss), "tensors_bit_identical": identical,
                          "ranks_and_scales_equal": same_scales, "torch": torch.__version__,
                          "cpus": os.cpu_count()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
