"""Resize a rank-64 adapter to rank 16: loratool's factored truncation against the dense route.

The dense route is what kohya's resize (and PEFT's svd combine) do: materialise ΔW = s·B·A (out x in) and
take torch.linalg.svd of it (full_matrices=False, the cheaper variant), in float32. loratool runs
`ops.rescale.resize` (numpy), which works from the factors only. Both keep 16 singular values.

Accuracy: the kept singular values of each route are compared with each other and with a float64 reference
(a factored SVD in float64, exact to ~1e-15 relative), as the largest relative difference over the 16.

Run (one run, serialised with other benchmarks):

    flock /tmp/loratool-bench.lock /work/venv/bin/python benchmarks/resize.py

Options: --shapes 4096x4096,14336x4096  --rank 64  --keep 16  --threads N (torch's and numpy's BLAS threads;
default: each library's own)  --json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from loratool.adapter import Adapter, whole_target
from loratool.device import blas_threads
from loratool.ops.linalg import factored_svd, stacked_factors
from loratool.ops.rescale import resize


def make_adapter(shapes, rank: int, seed: int = 0) -> Adapter:
    """Factors as numpy float32 arrays, as the readers hold them."""
    rng = np.random.default_rng(seed)
    targets = []
    for i, (out, inp) in enumerate(shapes):
        A = (rng.standard_normal((rank, inp)) / inp ** 0.5).astype(np.float32)  # (r, in), Kaiming-like
        B = (rng.standard_normal((out, rank)) * 0.01).astype(np.float32)  # (out, r), a trained-LoRA-like magnitude
        targets.append(whole_target(f"layers.{i}.proj_{out}x{inp}.weight", "linear", (out, inp), A, B,
                                    alpha=2.0 * rank))
    return Adapter(targets={t.key: t for t in targets})


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.abs(b)).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    adapter = make_adapter(shapes, args.rank)

    t0 = time.perf_counter()
    with blas_threads(args.threads):
        res = resize(adapter, rank=args.keep)
    t_factored = time.perf_counter() - t0

    rows = []
    for t, t_new, row in zip(adapter, res.adapter, res.rows):
        b = t.blocks[0]
        Bs, As = stacked_factors(t)
        ref = factored_svd(Bs.astype(np.float64), As.astype(np.float64))[1][:args.keep]  # float64 reference
        new_S = factored_svd(*stacked_factors(t_new))[1][:args.keep]  # what the resized block holds

        t1 = time.perf_counter()
        dense = (torch.from_numpy(b.B) @ torch.from_numpy(b.A)) * b.scale  # (out, r) @ (r, in) -> (out, in)
        _, S_dense, _ = torch.linalg.svd(dense, full_matrices=False)
        t_dense = time.perf_counter() - t1
        del dense
        S_dense = S_dense[:args.keep].numpy()

        rows.append({
            "target": t.key, "shape": list(t.shape), "rank": b.rank, "keep": args.keep,
            "dense_s": t_dense,
            "max_rel_diff_kept_sv_loratool_vs_dense": max_rel(new_S, S_dense),
            "max_rel_diff_kept_sv_loratool_vs_f64": max_rel(new_S, ref),
            "max_rel_diff_kept_sv_dense_vs_f64": max_rel(S_dense, ref),
            "energy_retained": row["energy_retained"],
        })
    t_dense_total = sum(r["dense_s"] for r in rows)
    doc = {
        "benchmark": "resize", "machine": f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} torch threads", "torch": torch.__version__,
        "loratool_s": t_factored, "dense_s": t_dense_total, "speedup": t_dense_total / t_factored,
        "max_rel_diff_kept_sv": max(r["max_rel_diff_kept_sv_loratool_vs_dense"] for r in rows), "targets": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in rows:
        print(f"{r['target']}: dense {r['dense_s']:.2f} s; kept-sv max rel diff vs dense "
              f"{r['max_rel_diff_kept_sv_loratool_vs_dense']:.2e}, loratool vs f64 "
              f"{r['max_rel_diff_kept_sv_loratool_vs_f64']:.2e}, dense vs f64 {r['max_rel_diff_kept_sv_dense_vs_f64']:.2e}; "
              f"energy retained {r['energy_retained']:.4f}")
    print(f"loratool (both targets, whole resize) {t_factored:.3f} s; dense {t_dense_total:.2f} s; "
          f"speedup {doc['speedup']:.0f}x; largest kept-sv relative difference {doc['max_rel_diff_kept_sv']:.2e}")


if __name__ == "__main__":
    main()
