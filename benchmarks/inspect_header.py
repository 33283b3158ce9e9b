"""Time `loratool inspect` (header only) on a generated ~1 GB adapter against `loratool --version`.

Both are whole processes (interpreter start included), run alternately, median of N runs. Also checks with
`python -X importtime` that inspect imports no torch.

    python benchmarks/inspect_header.py [--runs 15] [--dir /tmp/loratool-bench]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def make_adapter(path: Path, gib: float = 1.0) -> None:
    import torch

    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    rank, d = 64, 4096
    per_target = 2 * rank * d * 2  # A and B, bf16
    n = int(gib * 2**30 / per_target)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(rank, d, generator=g).bfloat16()
    B = torch.randn(d, rank, generator=g).bfloat16()
    targets = [whole_target(f"model.layers.{i // 7}.proj{i % 7}.weight", "linear", (d, d), A, B, 16)
               for i in range(n)]
    save(Adapter(targets={t.key: t for t in targets}), path)


def timed(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--dir", default="/tmp/loratool-bench")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "adapter-1gb.safetensors"
    if not path.exists():
        make_adapter(path)
    size = path.stat().st_size
    exe = [sys.executable, "-m", "loratool"]
    inspect, version = [], []
    for _ in range(args.runs):
        version.append(timed(exe + ["--version"]))
        inspect.append(timed(exe + ["inspect", str(path)]))
    imports = subprocess.run([sys.executable, "-X", "importtime", "-m", "loratool", "inspect", str(path)],
                             capture_output=True, text=True).stderr
    torch_imported = any(line.rstrip().endswith("| torch") for line in imports.splitlines())
    mi, mv = statistics.median(inspect), statistics.median(version)
    print(f"adapter: {size / 2**30:.2f} GiB")
    print(f"loratool --version        median {mv * 1000:.0f} ms over {args.runs} runs")
    print(f"loratool inspect (header) median {mi * 1000:.0f} ms (max {max(inspect) * 1000:.0f} ms), "
          f"ratio {mi / mv:.2f}x --version")
    print(f"torch imported by inspect: {torch_imported}")


if __name__ == "__main__":
    main()
