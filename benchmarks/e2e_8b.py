"""Time `loratool merge` and `loratool extract` on the 8B-class model against `cp -r` of it (issue 11).

The inputs come from benchmarks/make_8b.py (WORK/base, WORK/finetuned, WORK/adapter). Each round runs these
pairs of whole processes, the reference first and loratool right after it, after a `sync` each, so a slow
drift of the machine hits both members of a pair:

  merge --no-fsync    cp -r base out                 vs  loratool merge base adapter -o out --no-fsync
  merge               cp -r base out && sync out/*   vs  loratool merge base adapter -o out   (fsync, the default)
  extract --rank 16   cp -r base out                 vs  loratool extract finetuned base --rank 16 -o out.safetensors

Peak RSS and CPU time of each process come from wait4 (its own and its waited-for children's). Outputs go to
--scratch (default WORK) and are removed after every run. Prints a Markdown table (medians, the runs, the
ratio of medians, the paired ratios, loratool's peak RSS) to stdout; progress to stderr.

    python benchmarks/make_8b.py --out /tmp/loratool-bench/8b
    flock /tmp/loratool-bench.lock python benchmarks/e2e_8b.py --work /tmp/loratool-bench/8b --rounds 3
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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
OPS = ("merge-no-fsync", "merge", "extract")


def run(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS (MiB) and CPU seconds of one whole process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # Read stderr before waiting (a full pipe would block the child), then reap it ourselves for its rusage.
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"e2e_8b: {' '.join(cmd[:6])} ... exited {p.returncode}:\n{err.decode()[-3000:]}")
    return {"s": wall, "rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def commands(work: Path, scratch: Path, rank: int) -> dict[str, tuple[str, str, list[str], list[str]]]:
    """op id -> (label, reference label, reference command, loratool command)."""
    base, ft, adapter = work / "base", work / "finetuned", work / "adapter"
    out = scratch / "out"
    lt = [PY, "-m", "loratool"]
    cp = ["cp", "-r", str(base), str(out)]
    return {
        "merge-no-fsync": ("merge --no-fsync", "cp -r", cp,
                           [*lt, "merge", str(base), str(adapter), "-o", str(out), "-q", "--no-fsync"]),
        # The durable floor for loratool's default, which fsyncs its output before the rename.
        "merge": ("merge", "cp -r && sync", ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(base), str(out)],
                  [*lt, "merge", str(base), str(adapter), "-o", str(out), "-q"]),
        "extract": (f"extract --rank {rank}", "cp -r", cp,
                    [*lt, "extract", str(ft), str(base), "--rank", str(rank), "-o", str(scratch / "out.safetensors"),
                     "-q", "--json"]),
    }


def clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    subprocess.run(["sync"], check=True)  # every run starts with no dirty pages from the previous one


def table(rows: list[dict]) -> str:
    def runs(xs):
        return f"{statistics.median(xs):.2f} s ({', '.join(f'{x:.2f}' for x in xs)})"

    lines = ["| operation | loratool median (runs) | reference | reference median (runs) | ratio | paired ratios "
             "| loratool peak RSS | loratool CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {runs(r['loratool_s'])} | `{r['reference']}` | {runs(r['reference_s'])} "
                     f"| {r['ratio']:.2f}× | {', '.join(f'{x:.2f}' for x in r['paired'])} "
                     f"| {r['peak_rss_mib']:.0f} MiB | {statistics.median(r['cpu_s']):.1f} s |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench/8b"),
                    help="folder with base/, finetuned/, adapter/ from benchmarks/make_8b.py")
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs go (default: WORK)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--rank", type=int, default=16, help="extract's --rank")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    work, scratch = args.work, args.scratch or args.work
    for part, marker in (("base", "model.safetensors.index.json"), ("finetuned", "model.safetensors.index.json"),
                         ("adapter", "adapter_config.json")):
        if not (work / part / marker).is_file():
            raise SystemExit(f"e2e_8b: {work / part} is missing or incomplete: run "
                             f"`python benchmarks/make_8b.py --out {work}` first")
    cmds = commands(work, scratch, args.rank)
    ops = [w.strip() for w in args.ops.split(",") if w.strip()]
    if not ops or set(ops) - set(cmds):
        ap.error(f"--ops takes a comma-separated subset of {','.join(cmds)}, not {args.ops!r}")
    base_bytes = sum(p.stat().st_size for p in (work / "base").iterdir())
    scratch.mkdir(parents=True, exist_ok=True)
    outputs = (scratch / "out", scratch / "out.safetensors")
    free = shutil.disk_usage(scratch).free
    if free < base_bytes + (1 << 30):
        raise SystemExit(f"e2e_8b: {scratch} has {free / 1e9:.1f} GB free; a merged copy of the base needs "
                         f"{base_bytes / 1e9:.1f} GB and 1 GiB to spare: free some space or choose another --scratch")
    res = {op: {"op": cmds[op][0], "reference": cmds[op][1], "loratool_s": [], "reference_s": [], "cpu_s": [],
                "rss": [], "ref_rss": []} for op in ops}
    for rnd in range(args.rounds):
        for op in ops:
            _, _, ref, lt = cmds[op]
            clear(*outputs)
            a = run(ref)
            clear(*outputs)
            b = run(lt)
            clear(*outputs)
            r = res[op]
            r["reference_s"].append(a["s"])
            r["ref_rss"].append(a["rss_mib"])
            r["loratool_s"].append(b["s"])
            r["cpu_s"].append(b["cpu_s"])
            r["rss"].append(b["rss_mib"])
            print(f"round {rnd + 1} {r['op']:18s} {r['reference']} {a['s']:7.2f} s  loratool {b['s']:7.2f} s "
                  f"(CPU {b['cpu_s']:.1f} s, peak RSS {b['rss_mib']:.0f} MiB)  load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
    rows = []
    for r in res.values():
        ratio = statistics.median(r["loratool_s"]) / statistics.median(r["reference_s"])
        rows.append({"op": r["op"], "reference": r["reference"], "loratool_s": [round(x, 2) for x in r["loratool_s"]],
                     "reference_s": [round(x, 2) for x in r["reference_s"]], "ratio": round(ratio, 3),
                     "paired": [round(b / a, 2) for a, b in zip(r["reference_s"], r["loratool_s"])],
                     "peak_rss_mib": round(max(r["rss"]), 1), "reference_peak_rss_mib": round(max(r["ref_rss"]), 1),
                     "cpu_s": [round(x, 2) for x in r["cpu_s"]]})
    out = {"work": str(work), "base_bytes": base_bytes, "rounds": args.rounds, "cpus": os.cpu_count(),
           "load_avg_at_end": os.getloadavg()[0], "rows": rows}
    print(f"base: {base_bytes / 1e9:.2f} GB in {work / 'base'}; {args.rounds} rounds; "
          f"load at the end {out['load_avg_at_end']:.1f}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
