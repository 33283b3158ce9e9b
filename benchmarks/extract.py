"""Benchmark `loratool extract` (issue 6): loratool's randomized SVD against a full dense SVD, and a whole
end-to-end extraction against `cp -r` of one model.

svd   On the matrix shapes of an 8B Llama (4096x4096 q/o, 1024x4096 k/v, 14336x4096 gate/up,
      4096x14336 down), a seeded ΔW with a realistic spectrum: a rank-64 signal with singular values
      exp(-i/16) plus Gaussian noise of half the signal's Frobenius norm (noise is 20% of the energy).
      Times `torch.linalg.svd(ΔW, full_matrices=False)` (what kohya, PEFT and mergekit run) once per shape,
      and loratool's `randomized_svd` as extract runs it on the CPU (ops/svd.py on numpy; sketch 2k,
      extract's default power iterations unless --power-iterations) at ranks 16
      and 64 (median of 3). Reports the time ratio and the ratio of each method's relative Frobenius error
      (measured on the truncated factors, float64 sums) to the Eckart-Young optimum (from the full SVD).
e2e   The merge benchmark's synthetic ~1.1B Llama (benchmarks/merge.py builds it, cached) as the base, and a
      finetune built here once: every projection and the lm_head get + a rank-32 signal + small noise, norms
      and embeddings get small noise (bf16, sharded like the base). Then alternately, as whole processes:
      `cp -r base out` and `python -m loratool extract ft base --rank 16 -o out.safetensors -q`, with peak
      RSS from /usr/bin/time.

lanes (`--lanes`) GFLOP/s of the thin products on one thread, on all threads, and one per core side by
      side: why extract runs one pair per core (ops/extract_run.py).
variants (`--variants`) error ratios of cheaper sketch variants (three passes, k + 8, block Krylov).
breakdown (`--breakdown`) the lanes reading alone, reading and factorising, and the whole extraction, in
      process.
set   (`--set cuda`) the whole 8B set, 224 matrices, through the randomized SVD as `extract --device cuda`
      runs it (one matrix at a time, on the device); compute time only.

    flock /tmp/loratool-bench.lock /work/venv/bin/python benchmarks/extract.py --svd --e2e --rounds 3
    python benchmarks/extract.py --set cuda          # on a machine with a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
RANKS = (16, 64)


def spectrum_matrix(m: int, n: int, seed: int, r: int = 64, decay: float = 16.0, noise: float = 0.5,
                    device: str = "cpu"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, device=device))[0]  # (m, r) orthonormal
    V = torch.linalg.qr(torch.randn(n, r, generator=g, device=device))[0]  # (n, r)
    s = torch.exp(-torch.arange(r, dtype=torch.float32, device=device) / decay)
    M = (U * s) @ V.T  # (m, n) rank-64 signal
    N = torch.randn(m, n, generator=g, device=device)
    M += N * (noise * M.norm() / N.norm())
    return M


def rel_error(M, B, A) -> float:
    """Relative Frobenius error of numpy factors (float32 products, float64 sums)."""
    from loratool.device import cpu
    from loratool.ops.svd import residual_squares, sum_squares

    return math.sqrt(residual_squares(cpu(), M, B, A) / sum_squares(cpu(), M))


def bench_svd(reps: int = 3, iterations=None) -> list[dict]:
    import torch

    from loratool.device import cpu
    from loratool.ops.svd import DEFAULT_POWER_ITERATIONS, randomized_svd, seed_for, sketch_size

    rows = []
    for si, (m, n) in enumerate(SHAPES):
        Mt = spectrum_matrix(m, n, seed=si)
        M = Mt.numpy()  # extract on the CPU: numpy
        E = float(Mt.double().square().sum())
        t = time.perf_counter()
        U, S, Vh = torch.linalg.svd(Mt, full_matrices=False)
        t_full = time.perf_counter() - t
        for k, q in [(k, q) for k in RANKS for q in (iterations or [DEFAULT_POWER_ITERATIONS])]:
            optimum = math.sqrt(max(E - float(S[:k].double().square().sum()), 0.0) / E)
            full_err = rel_error(M, (U[:, :k] * S[:k]).numpy(), Vh[:k].numpy())
            l = sketch_size(k, m, n)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                Ur, Sr, Vhr = randomized_svd(cpu(), M, l, seed_for(0, f"{m}x{n}"), q)
                B, A = Ur[:, :k] * Sr[:k], Vhr[:k].copy()
                times.append(time.perf_counter() - t)
            t_rand = statistics.median(times)
            err = rel_error(M, B, A)
            row = {"shape": f"{m}x{n}", "rank": k, "sketch": l, "power_iterations": q,
                   "full_svd_s": round(t_full, 3), "loratool_s": round(t_rand, 4),
                   "loratool_runs_s": [round(x, 4) for x in times], "speedup": round(t_full / t_rand, 1),
                   "optimum_rel_error": round(optimum, 6), "full_svd_rel_error": round(full_err, 6),
                   "loratool_rel_error": round(err, 6), "error_ratio": round(err / optimum, 5)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del U, S, Vh, M, Mt
    return rows


def bench_set(device: str, layers: int, rank: int = 16) -> dict:
    """The 8B set (7 matrices x `layers`) through loratool's randomized SVD on `device`, as `extract --device`
    runs it: one matrix at a time, the factors B = U diag(S), A = Vh left on the device. Compute only: the
    matrices are made on the device first (spectrum as above, seeded per matrix)."""
    from loratool.device import session
    from loratool.ops.svd import DEFAULT_POWER_ITERATIONS, randomized_svd, residual_squares, seed_for, \
        sketch_size, sum_squares

    shapes = {(4096, 4096): 2 * layers, (1024, 4096): 2 * layers, (14336, 4096): 2 * layers, (4096, 14336): layers}
    with session(device) as dev:
        work = []
        for (m, n), count in shapes.items():
            for i in range(count):
                M = spectrum_matrix(m, n, seed=1000 * m + n + i, device="cpu" if dev.is_cpu else dev.name)
                work.append(((m, n), M.numpy() if dev.is_cpu else M, seed_for(0, f"{m}x{n}.{i}")))
        dev.synchronize()
        t = time.perf_counter()
        results = []
        for (m, n), M, seed in work:
            U, S, Vh = randomized_svd(dev, M, sketch_size(rank, m, n), seed, DEFAULT_POWER_ITERATIONS)
            results.append((U[:, :rank] * S[:rank], Vh[:rank]))
        dev.synchronize()
        compute = time.perf_counter() - t
        worst = 0.0
        for ((m, n), M, _), (B, A) in zip(work[::2 * layers], results[::2 * layers]):  # one of each shape
            worst = max(worst, math.sqrt(residual_squares(dev, M, B, A) / sum_squares(dev, M)))
        gpu = None
        if not dev.is_cpu:
            import torch

            gpu = torch.cuda.get_device_name(dev.name)
    return {"device": device, "matrices": len(work), "rank": rank, "compute_s": round(compute, 3),
            "max_rel_error_one_per_shape": round(worst, 5), "gpu": gpu}


def build_finetune(base: Path, ft: Path, seed: int = 1) -> Path:
    """ft = base + rank-32 signal + noise on every 2-D projection and lm_head; small noise elsewhere."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from loratool.io.base import open_base

    if (ft / "model.safetensors.index.json").is_file():
        return ft
    tmp = ft.with_name(ft.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for k, name in index["weight_map"].items():
        by_shard.setdefault(name, []).append(k)
    g = torch.Generator().manual_seed(seed)
    src = open_base(base)
    for name, keys in sorted(by_shard.items()):
        out = {}
        for k in sorted(keys):
            W = torch.from_numpy(src.read(k).astype(np.float32))
            if W.ndim == 2 and "embed_tokens" not in k:
                m, n = W.shape
                U = torch.randn(m, 32, generator=g) / math.sqrt(m)
                V = torch.randn(32, n, generator=g) / math.sqrt(n)
                s = 0.5 * torch.exp(-torch.arange(32, dtype=torch.float32) / 8)  # ||signal|| ~ 1
                D = (U * s) @ V  # (m, 32) @ (32, n)
                D += torch.randn(m, n, generator=g) * (0.2 / math.sqrt(m * n))  # noise: 20% of the signal's norm
                W += D
            else:
                W += torch.randn(W.shape, generator=g) * 1e-3
            out[k] = W.to(torch.bfloat16).contiguous()
        save_file(out, str(tmp / name), metadata={"format": "pt"})
        print(f"built {name}", file=sys.stderr, flush=True)
    src.close()
    shutil.copy(base / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
    shutil.copy(base / "config.json", tmp / "config.json")
    os.replace(tmp, ft)
    return ft


def timed(cmd: list[str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")
    rss = int(r.stderr.strip().splitlines()[-1]) * 1024
    return wall, rss, r.stderr


def bench_e2e(work: Path, rounds: int, power_iterations: int | None = None, device: str = "cpu") -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import merge  # the merge benchmark's model builder (shared cache)

    base, _ = merge.build(work / "merge")
    ft = build_finetune(base, work / "extract" / "ft")
    size = sum(p.stat().st_size for p in base.iterdir())
    cps, runs = [], []
    out_cp, out = work / "extract" / "cp-out", work / "extract" / "adapter.safetensors"
    for i in range(rounds):
        shutil.rmtree(out_cp, ignore_errors=True)
        out.unlink(missing_ok=True)
        subprocess.run(["sync"])
        cps.append(timed(["cp", "-r", str(base), str(out_cp)])[:2])
        subprocess.run(["sync"])
        extra = ([] if power_iterations is None else ["--power-iterations", str(power_iterations)]) + \
            ([] if device == "cpu" else ["--device", device])
        wall, rss, err = timed([PY, "-m", "loratool", "extract", str(ft), str(base), "--rank", "16", "-o", str(out),
                                "-q", "--json", *extra])
        runs.append((wall, rss))
        print(f"round {i}: cp {cps[-1][0]:.2f} s, extract {wall:.2f} s, peak RSS {rss / 2**30:.3f} GiB",
              file=sys.stderr, flush=True)
    shutil.rmtree(out_cp, ignore_errors=True)
    from loratool.io.native import load

    info = load(out).info["extract"]
    cp_med = statistics.median(w for w, _ in cps)
    ex_med = statistics.median(w for w, _ in runs)
    return {"model_bytes": size, "cp_s": [round(w, 2) for w, _ in cps], "extract_s": [round(w, 2) for w, _ in runs],
            "cp_median_s": round(cp_med, 2), "extract_median_s": round(ex_med, 2),
            "ratio_to_cp": round(ex_med / cp_med, 2), "peak_rss_gib": round(max(r for _, r in runs) / 2**30, 3),
            "targets": info["targets"], "parameters": info["parameters"], "rel_error": round(info["rel_error"], 5),
            "energy": round(info["energy"], 5), "not_extracted": len(info["not_extracted"]),
            "power_iterations": info["power_iterations"], "device": device}


def breakdown(work: Path) -> dict:
    """Where an end-to-end run's time goes, in this process: the lanes reading alone (pread, widen, subtract,
    sum of squares and the first sketch, one pair per lane), the same with the SVDs, and the whole in-process
    extraction (with the output's factors and report)."""
    from loratool.device import blas_threads, cpu
    from loratool.io.base import open_base
    from loratool.ops import extract as ex
    from loratool.ops import extract_run as lanes

    ft, base = open_base(work / "extract" / "ft"), open_base(work / "merge" / "base")
    opts = ex.ExtractOptions(rank=16)
    dev = cpu()
    entries = [e for e in ex.plan(ft, base, opts) if e.whole]
    n_lanes, per_lane = lanes.lane_plan()
    sizes = lanes.slot_sizes(entries, n_lanes)

    def read(s, e, delta):
        lanes.subtract(ft, base, e, delta, s, ex.sketch_while_reading(dev, e, opts))

    def read_and_factorize(s, e, delta):
        E, Y, W = lanes.subtract(ft, base, e, delta, s, ex.sketch_while_reading(dev, e, opts))
        if E and e.role == "matrix":
            ex.factorize(dev, ex._view(dev.xp, e, delta), e, E, opts, Y, W)

    res = {"lanes": n_lanes, "blas_threads_per_lane": per_lane}
    with blas_threads(per_lane):
        for name, fn in (("read_s", read), ("read_and_svd_s", read_and_factorize)):
            t = time.perf_counter()
            lanes.run_lanes(entries, fn, n_lanes, sizes)
            res[name] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ex.extract(ft, base, opts)
    res["extract_in_process_s"] = round(time.perf_counter() - t, 2)
    return res


def bench_lanes(reps: int = 10) -> list[dict]:
    """Why extract's CPU route runs one pair per core: GFLOP/s of the thin products of a rank-16 sketch (M by
    32 columns, both directions: M @ Z and Q^T @ M) with numpy's BLAS on one thread, on all threads, and as
    one single-threaded product per core side by side (ops/extract_run.py's lanes), for a q_proj-sized and
    an up_proj-sized M of the 1.1B model."""
    import threading

    import numpy as np

    from loratool.device import blas_threads

    cores = len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    rows = []
    for m, n in ((2048, 2048), (5632, 2048)):
        work = [(rng.standard_normal((m, n), dtype=np.float32), rng.standard_normal((n, 32), dtype=np.float32),
                 rng.standard_normal((32, m), dtype=np.float32)) for _ in range(cores)]
        flop = 2 * 2 * m * n * 32 * reps

        def products(M, Z, Qt):
            for _ in range(reps):
                M @ Z
                Qt @ M

        def rate(fn, streams):
            fn()
            t = time.perf_counter()
            fn()
            return round(streams * flop / (time.perf_counter() - t) / 1e9, 1)

        def side_by_side():
            ts = [threading.Thread(target=products, args=w) for w in work]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        row = {"shape": f"{m}x{n}", "cores": cores, "all_threads_gflops": rate(lambda: products(*work[0]), 1)}
        with blas_threads(1):
            row["one_thread_gflops"] = rate(lambda: products(*work[0]), 1)
            row["one_per_core_side_by_side_gflops"] = rate(side_by_side, cores)
        rows.append(row)
    return rows


def bench_variants(ranks=RANKS) -> list[dict]:
    """Error ratios to the optimum of sketch variants cheaper than extract's (4 passes over M, sketch 2k),
    on two of the 8B shapes (spectrum as --svd; the optimum from float64 eigenvalues of the small Gram):
    three passes (the basis Z after one half iteration, then M Z Z^T), a sketch of k + 8 columns, and block
    Krylov ([Q0, M M^T Q0] with l = 1.5k, then the projection: 5 passes of l columns)."""
    import numpy as np

    from loratool.device import cpu
    from loratool.ops import svd as sh

    dev = cpu()

    def three_passes(M, l, seed):
        m, n = M.shape
        Zt = np.random.default_rng(seed).standard_normal((l, m), dtype=np.float32) @ M  # (l, n)
        Z = sh._normalize(dev, Zt.T)
        Q = sh.orthonormal_basis(dev, M @ Z)
        Ub, S, Vh = sh._thin_svd_wide(dev, Q.T @ M)
        return S

    def block_krylov(M, l, seed):
        Q0 = sh.orthonormal_basis(dev, M @ sh.gaussian_sketch(M.shape[1], l, seed))
        K = sh.orthonormal_basis(dev, np.hstack([Q0, M @ sh._normalize(dev, (Q0.T @ M).T)]))
        return sh._thin_svd_wide(dev, K.T @ M)[1]

    rows = []
    for si, (m, n) in enumerate([(1024, 4096), (4096, 4096)]):
        M = spectrum_matrix(m, n, seed=si).numpy()
        M64 = M.astype(np.float64)
        E = float((M64 ** 2).sum())
        ev = np.sort(np.linalg.eigvalsh(M64 @ M64.T if m <= n else M64.T @ M64))[::-1]
        del M64
        for k in ranks:
            opt = math.sqrt(max(E - ev[:k].sum(), 0.0) / E)

            def ratio(S):
                return round(math.sqrt(max(E - float((S[:k].astype(np.float64) ** 2).sum()), 0.0) / E) / opt, 5)

            seed = sh.seed_for(0, f"{m}x{n}")
            row = {"shape": f"{m}x{n}", "rank": k,
                   "default": ratio(sh.randomized_svd(dev, M, 2 * k, seed)[1]),
                   "three_passes": ratio(three_passes(M, 2 * k, seed)),
                   "sketch_k_plus_8": ratio(sh.randomized_svd(dev, M, k + 8, seed)[1]),
                   "block_krylov_1.5k": ratio(block_krylov(M, k + k // 2, seed))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--svd", action="store_true", help="randomized vs full SVD on 8B-Llama shapes")
    ap.add_argument("--e2e", action="store_true", help="end-to-end extract of the ~1.1B pair vs cp -r")
    ap.add_argument("--e2e-power-iterations", type=int, default=None, help="pass --power-iterations to the e2e extract")
    ap.add_argument("--e2e-device", default="cpu", help="pass --device to the e2e extract")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--power-iterations", default=None, help="comma list for --svd (default: extract's default)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--breakdown", action="store_true", help="time import, reader and in-process extract")
    ap.add_argument("--lanes", action="store_true", help="thin-product GFLOP/s: one thread, all, one per core")
    ap.add_argument("--variants", action="store_true", help="error ratios of cheaper sketch variants")
    ap.add_argument("--set", dest="set_device", help="time the whole 8B set (224 matrices) on this device")
    ap.add_argument("--layers", type=int, default=32, help="layers in --set (32 for 8B)")
    a = ap.parse_args()
    import torch

    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    if a.svd:
        res["svd"] = bench_svd(iterations=[int(x) for x in a.power_iterations.split(",")]
                               if a.power_iterations else None)
    if a.e2e:
        res["e2e"] = bench_e2e(a.work, a.rounds, a.e2e_power_iterations, a.e2e_device)
    if a.breakdown:
        res["breakdown"] = breakdown(a.work)
    if a.lanes:
        res["lanes"] = bench_lanes()
    if a.variants:
        res["variants"] = bench_variants()
    if a.set_device:
        res["set"] = bench_set(a.set_device, a.layers)
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
