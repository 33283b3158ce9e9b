"""Time `loratool inspect` (headers and configs only) on generated ~1 GB adapters, against `loratool --version`.

Three adapters, written once with numpy (seeded bf16 factors) into --dir:
  native  1,024 rank-64 targets on 4096 x 4096 (1.0 GiB), a loratool .safetensors file
  peft    a Llama-8B-shaped PEFT folder: q/k/v/o (4096 x 4096), gate/up (14336 x 4096), down (4096 x 14336)
          on 32 layers, rank 176, lora_alpha 32 (224 modules, 0.99 GB adapter_model.safetensors)
  kohya   the same modules as a kohya file (lora_down/lora_up/alpha, `lora_unet_` names)
  diffusers, comfy, mlx, gguf   the PEFT adapter written in that dialect by loratool (`--dialects` picks them)

Each inspect and each `--version` is a whole process (interpreter start included, bytecode cached), run
alternately, median of N runs; peak RSS comes from GNU time (/usr/bin/time). It also checks, with
`python -X importtime`, whether inspect imports torch.

    python benchmarks/inspect_header.py [--runs 15] [--dir /tmp/loratool-bench] [--dialects native,peft,kohya]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's loratool, for the generators and the timed processes alike

LAYERS = 32
HIDDEN, INTER = 4096, 14336
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
PEFT_RANK = 176


def _factors(rank: int, shapes) -> dict:
    """One seeded (A, B) pair per weight shape, bf16, shared by every module of that shape (what is measured is
    the header, and sharing keeps the generator's memory at a few hundred MB)."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for out_f, in_f in sorted(set(shapes)):
        A = rng.standard_normal((rank, in_f), dtype=np.float32).astype(ml_dtypes.bfloat16)
        B = rng.standard_normal((out_f, rank), dtype=np.float32).astype(ml_dtypes.bfloat16)
        out[(out_f, in_f)] = (A, B)
    return out


def make_native(path: Path) -> None:
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    rank, d, n = 64, 4096, 1024
    A, B = _factors(rank, [(d, d)])[(d, d)]
    targets = [whole_target(f"model.layers.{i // 7}.proj{i % 7}.weight", "linear", (d, d), A, B, 16)
               for i in range(n)]
    save(Adapter(targets={t.key: t for t in targets}), path)


def make_peft(folder: Path) -> None:
    from loratool.container import write_file

    pairs = _factors(PEFT_RANK, MODULES.values())
    tensors = {}
    for layer in range(LAYERS):
        for m, shape in MODULES.items():
            A, B = pairs[shape]
            p = f"base_model.model.model.layers.{layer}.{m}"
            tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"] = A, B
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": PEFT_RANK, "lora_alpha": 32,
           "target_modules": sorted({m.split(".")[1] for m in MODULES}), "use_rslora": False, "lora_dropout": 0.0,
           "bias": "none", "base_model_name_or_path": "synthetic-llama-8b-shape"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    write_file(folder / "adapter_model.safetensors", tensors, {"format": "pt"})


def make_kohya(path: Path) -> None:
    import numpy as np

    from loratool.container import write_file

    pairs = _factors(PEFT_RANK, MODULES.values())
    tensors = {}
    for layer in range(LAYERS):
        for m, shape in MODULES.items():
            A, B = pairs[shape]
            name = f"lora_unet_model_layers_{layer}_{m.replace('.', '_')}"
            tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"] = A, B
            tensors[name + ".alpha"] = np.array(32.0, np.float32)
    write_file(path, tensors, {"ss_network_dim": str(PEFT_RANK), "ss_network_alpha": "32"})


def _converted(to: str, **options):
    """A maker that writes the PEFT adapter (made first if needed) in another dialect with loratool itself."""

    def make(path: Path) -> None:
        from loratool.io import registry

        peft = path.parent / MAKERS["peft"][0]
        if not peft.exists():
            make_peft(peft)
        registry.get(to).write(registry.load(peft), path, overwrite=True, **options)

    return make


MAKERS = {"native": ("adapter-1gb.safetensors", make_native), "peft": ("peft-1gb", make_peft),
          "kohya": ("kohya-1gb.safetensors", make_kohya),
          "diffusers": ("diffusers-1gb.safetensors", _converted("diffusers")),
          "comfy": ("comfy-1gb.safetensors", _converted("comfy")),
          "mlx": ("mlx-1gb", _converted("mlx")),
          "gguf": ("lora-1gb.gguf", _converted("gguf", heads=(32, 8)))}


# Bytecode is cached as after any install; a PYTHONDONTWRITEBYTECODE in the caller's environment would make
# every timed process compile loratool's sources again (~80 ms here).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one whole process; the RSS from GNU time, which measures the process
    itself (a forked child's own accounting would include the pages it shares with this script)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd], check=True, stdout=subprocess.DEVNULL,
                       cwd=ROOT, env=ENV)
        wall = time.perf_counter() - t0
        return wall, int(rss.read().split()[-1])


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--dir", default="/tmp/loratool-bench")
    ap.add_argument("--dialects", default="native,peft,kohya")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "loratool"]
    timed(exe + ["--version"])  # writes the bytecode cache once
    for dialect in args.dialects.split(","):
        name, make = MAKERS[dialect]
        path = d / name
        if not path.exists():
            make(path)
        inspect, version, rss = [], [], []
        for _ in range(args.runs):
            version.append(timed(exe + ["--version"])[0])
            wall, peak = timed(exe + ["inspect", str(path)])
            inspect.append(wall)
            rss.append(peak)
        imports = subprocess.run([sys.executable, "-X", "importtime", "-m", "loratool", "inspect", str(path)],
                                 capture_output=True, text=True, cwd=ROOT, env=ENV).stderr
        torch_imported = any(line.rstrip().endswith("| torch") for line in imports.splitlines())
        mi, mv = statistics.median(inspect), statistics.median(version)
        print(f"{dialect}: {size_of(path) / 2**30:.2f} GiB ({path})")
        print(f"  loratool --version        median {mv * 1000:.0f} ms over {args.runs} runs")
        print(f"  loratool inspect (header) median {mi * 1000:.0f} ms (max {max(inspect) * 1000:.0f} ms), "
              f"ratio {mi / mv:.2f}x --version, peak RSS {max(rss) / 1024:.0f} MiB")
        print(f"  torch imported by inspect: {torch_imported}")


if __name__ == "__main__":
    main()
