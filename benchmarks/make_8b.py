"""Write the 8B-class benchmark inputs straight to disk: a Llama-3-8B-shaped bf16 model, its finetuned twin and
a rank-16 PEFT adapter, shard by shard and chunk by chunk, in bounded memory (issue 11, item 8).

    DIR/base        Hugging Face sharded folder: model-0000i-of-0000N.safetensors, model.safetensors.index.json
                    (metadata.total_size, weight_map), config.json (model_type llama). Hidden 4096, intermediate
                    14336, 32 layers, 32 heads, 8 key/value heads, vocab 128256, untied lm_head: 8.03 B
                    parameters, 16.06 GB of bf16 in 10 shards. Weights N(0, 0.02²), norms 1.
    DIR/finetuned   the same layout; every q/k/v/o/gate/up/down projection W becomes bf16(W + U·diag(s)·V + E):
                    a rank-32 signal (s = 0.5·exp(-i/8), ||signal||_F ≈ 1) plus Gaussian noise of 20 % of the
                    signal's norm, as benchmarks/extract.py's finetune. Every other tensor has the base's bytes.
    DIR/adapter     adapter_config.json + adapter_model.safetensors: PEFT LoRA, r 16, lora_alpha 32, float32,
                    on q/k/v/o/gate/up/down of every layer (224 modules, 42 M parameters, 168 MB).

Every value comes from numpy's PCG64 (`standard_normal(dtype=float32)`), seeded per tensor chunk from
(--seed, stream, the tensor's name, chunk index), so the output is the same for any number of threads and the
finetuned twin regenerates its base values instead of reading them back. bf16 comes from ml_dtypes (round to
nearest even). Chunks of 4 Mi elements are made by a pool of threads (numpy's generator releases the GIL) and
written in order; base and finetuned are written in one pass when both are asked for, sharing the draws.
Peak RSS is a few hundred MiB whatever the model size.

    python benchmarks/make_8b.py --out /tmp/loratool-bench/8b                 # ~33 GB, the real thing
    python benchmarks/make_8b.py --out /tmp/tiny --tiny                       # same structure, 1.5 MB
    python benchmarks/make_8b.py --out /tmp/8b-1 --layers 1 --what base       # full width, one layer
    python benchmarks/make_8b.py --plan                                       # sizes and shards, nothing written
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import struct
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loratool.container import build_header  # noqa: E402  (canonical safetensors header bytes)

BF16 = ml_dtypes.bfloat16
PARTS = ("base", "finetuned", "adapter")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
CHUNK = 1 << 22  # elements per generated piece: 16 MiB of float32, a few such pieces in flight
HEADROOM = 512 << 20  # bytes left free on the disk after writing, for everything else on the machine
# Stream ids in the seed: one per kind of draw, so no two kinds share values.
BASE, NOISE, SIGNAL, LORA = 0, 1, 2, 3


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    intermediate: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    shards: int = 10
    signal_rank: int = 32  # rank of the finetune's change on each projection
    rank: int = 16  # the adapter's
    alpha: int = 32


LLAMA3_8B = Shape()
# Llama-3-8B's ratios at hidden 64: intermediate 3.5x, 4 query heads per key/value head, vocab ~31x hidden.
TINY = Shape(hidden=64, intermediate=224, layers=2, heads=8, kv_heads=2, vocab=2004, shards=3, signal_rank=4,
             rank=4, alpha=8)


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the order transformers' LlamaForCausalLM lists them."""
    kv = s.hidden // s.heads * s.kv_heads
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
                (p + "self_attn.k_proj.weight", (kv, s.hidden)),
                (p + "self_attn.v_proj.weight", (kv, s.hidden)),
                (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
                (p + "input_layernorm.weight", (s.hidden,)),
                (p + "post_attention_layernorm.weight", (s.hidden,))]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def is_projection(name: str) -> bool:
    return name.split(".")[-2] in ATTN + MLP


def shards(s: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the weights into at most s.shards files of about equal size, in order; a tensor goes to the
    shard its middle byte falls in (so a 1 GB embedding never makes a shard twice the others)."""
    ts = tensors(s)
    total = sum(2 * math.prod(shape) for _, shape in ts)
    target = total / s.shards
    groups: list[list] = [[] for _ in range(s.shards)]
    pos = 0
    for name, shape in ts:
        nb = 2 * math.prod(shape)
        groups[min(s.shards - 1, int((pos + nb / 2) // target))].append((name, shape))
        pos += nb
    return [g for g in groups if g]


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def adapter_tensors(s: Shape) -> list[tuple[str, tuple[int, int]]]:
    """PEFT keys and shapes: lora_A (r, in), lora_B (out, r) for every projection."""
    out = []
    for name, (o, i) in ((n, sh) for n, sh in tensors(s) if is_projection(n)):
        module = "base_model.model." + name.removesuffix(".weight")
        out += [(module + ".lora_A.weight", (s.rank, i)), (module + ".lora_B.weight", (o, s.rank))]
    return out


def config_json(s: Shape) -> dict:
    """What transformers writes for Llama-3-8B (LlamaConfig.save_pretrained), with these shapes."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
            "hidden_size": s.hidden, "initializer_range": 0.02, "intermediate_size": s.intermediate,
            "max_position_embeddings": 8192, "mlp_bias": False, "num_attention_heads": s.heads,
            "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.50.0", "use_cache": True,
            "vocab_size": s.vocab}


def adapter_config(s: Shape) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s.rank, "lora_alpha": s.alpha,
            "lora_dropout": 0.0, "target_modules": list(ATTN + MLP), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "base_model_name_or_path": None, "inference_mode": True}


def plan(s: Shape) -> dict:
    """Sizes of everything this script would write, without writing it."""
    groups = shards(s)
    model = sum(2 * math.prod(sh) for g in groups for _, sh in g)
    adapter = sum(4 * math.prod(sh) for _, sh in adapter_tensors(s))
    return {"shape": s.__dict__, "tensors": sum(len(g) for g in groups), "total_size": model,
            "parameters": model // 2, "shards": [sum(2 * math.prod(sh) for _, sh in g) for g in groups],
            "adapter_modules": len(adapter_tensors(s)) // 2, "adapter_bytes": adapter,
            "bytes": {"base": model, "finetuned": model, "adapter": adapter}}


# --- values ----------------------------------------------------------------------------------------------

def rng(seed: int, stream: int, name: str, chunk: int = 0) -> np.random.Generator:
    """A generator for one (stream, tensor, chunk): the same values whatever else is generated or in what order."""
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, key, chunk])))


def signal(seed: int, name: str, shape: tuple[int, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The finetune's rank-k change of one projection as factors: (U·diag(s) (m, k), V (k, n)), ||U s V||_F ≈ 1."""
    m, n = shape
    g = rng(seed, SIGNAL, name)
    s = 0.5 * np.exp(-np.arange(k, dtype=np.float32) / 8)
    us = g.standard_normal((m, k), dtype=np.float32) * (s / np.float32(math.sqrt(m)))
    v = g.standard_normal((k, n), dtype=np.float32) / np.float32(math.sqrt(n))
    return us, v


@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) of one tensor, and what to make of them."""

    name: str
    shape: tuple[int, ...]
    chunk: int
    r0: int
    r1: int
    base: bool
    finetuned: bool
    factors: tuple | None  # (U·diag(s), V) for a changed projection, else None


def pieces(name: str, shape: tuple[int, ...], base: bool, finetuned: bool, seed: int, k: int):
    rows = shape[0] if len(shape) == 2 else 1
    per = max(1, CHUNK // shape[-1])
    factors = signal(seed, name, shape, k) if finetuned and is_projection(name) else None
    for c, r0 in enumerate(range(0, rows, per)):
        yield Piece(name, shape, c, r0, min(rows, r0 + per), base, finetuned, factors)


def make(p: Piece, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(base bytes, finetuned bytes) of one piece, each a uint16 view of bf16 values (None where not asked)."""
    if len(p.shape) == 1:  # RMSNorm weights: ones, as initialised; the finetune leaves them alone
        ones = np.ones(p.shape, BF16).view(np.uint16)
        return ones if p.base else None, ones if p.finetuned else None
    n = p.shape[1]
    z = rng(seed, BASE, p.name, p.chunk).standard_normal((p.r1 - p.r0, n), dtype=np.float32)
    z *= np.float32(0.02)
    base = z.astype(BF16).view(np.uint16)
    if p.factors is None:
        return base if p.base else None, base if p.finetuned else None
    us, v = p.factors
    m = p.shape[0]
    d = rng(seed, NOISE, p.name, p.chunk).standard_normal((p.r1 - p.r0, n), dtype=np.float32)
    d *= np.float32(0.2 / math.sqrt(m * n))  # noise: 20 % of the signal's Frobenius norm
    d += us[p.r0:p.r1] @ v  # (rows, k) @ (k, n) -> (rows, n)
    d += z
    return base if p.base else None, d.astype(BF16).view(np.uint16)


def in_order(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map that keeps at most `window` results in flight, so memory stays bounded."""
    q: deque = deque()
    for it in items:
        q.append(pool.submit(fn, it))
        if len(q) >= window:
            yield q.popleft().result()
    while q:
        yield q.popleft().result()


def _header(entries, st_dtype: str, itemsize: int) -> bytes:
    hdr = build_header([(n, st_dtype, sh, itemsize * math.prod(sh)) for n, sh in entries], {"format": "pt"})
    return struct.pack("<Q", len(hdr)) + hdr


# --- writers ---------------------------------------------------------------------------------------------

def write_models(s: Shape, dirs: dict[str, Path], seed: int, threads: int, log) -> None:
    """Write base and/or finetuned (keys of dirs) shard by shard; both in one pass when both are asked for."""
    groups = shards(s)
    names = shard_names(len(groups))
    want_b, want_f = "base" in dirs, "finetuned" in dirs
    total = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for fname, group in zip(names, groups):
            entries = sorted(group)  # the header lists tensors by name, data in the same order
            header = _header(entries, "BF16", 2)
            files = {part: open(d / fname, "wb") for part, d in dirs.items()}
            try:
                for f in files.values():
                    f.write(header)
                work = (p for n, sh in entries for p in pieces(n, sh, want_b, want_f, seed, s.signal_rank))
                for b, ft in in_order(pool, lambda p: make(p, seed), work, 2 * threads):
                    if want_b:
                        files["base"].write(memoryview(b).cast("B"))
                    if want_f:
                        files["finetuned"].write(memoryview(ft).cast("B"))
            finally:
                for f in files.values():
                    f.close()
            total += len(dirs) * sum(2 * math.prod(sh) for _, sh in entries)
            dt = time.perf_counter() - t0
            log(f"{fname} ({', '.join(dirs)}): {total / 1e9:.2f} GB in {dt:.1f} s, {total / 1e6 / dt:.0f} MB/s")
    index = {"metadata": {"total_size": sum(2 * math.prod(sh) for g in groups for _, sh in g)},
             "weight_map": {n: fname for fname, g in zip(names, groups) for n, _ in sorted(g)}}
    for d in dirs.values():
        (d / "config.json").write_text(json.dumps(config_json(s), indent=2) + "\n")
        # Written last: a folder with an index is complete (see done()).
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_adapter(s: Shape, d: Path, seed: int) -> None:
    """adapter_model.safetensors tensor by tensor (float32: A ~ N(0, 1/in), B ~ N(0, 0.01²)), then its config."""
    entries = sorted(adapter_tensors(s))
    with open(d / "adapter_model.safetensors", "wb") as f:
        f.write(_header(entries, "F32", 4))
        for name, shape in entries:
            x = rng(seed, LORA, name).standard_normal(shape, dtype=np.float32)
            x *= np.float32(1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.01)
            f.write(memoryview(x).cast("B"))
    (d / "adapter_config.json").write_text(json.dumps(adapter_config(s), indent=2) + "\n")


def done(part: str, d: Path) -> bool:
    """Whether a previous run finished this folder (its last file exists)."""
    return (d / ("adapter_config.json" if part == "adapter" else "model.safetensors.index.json")).is_file()


def du(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="writes OUT/base, OUT/finetuned, OUT/adapter")
    ap.add_argument("--what", default="base,finetuned,adapter", help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, vocab 2004: Llama-3-8B's ratios")
    ap.add_argument("--layers", type=int, help="number of layers (default 32, or 2 with --tiny)")
    ap.add_argument("--shards", type=int, help="number of shards (default 10, or 3 with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="generator threads")
    ap.add_argument("--overwrite", action="store_true", help="rebuild parts that already exist")
    ap.add_argument("--plan", action="store_true", help="print the sizes as JSON and write nothing")
    args = ap.parse_args(argv)
    s = TINY if args.tiny else LLAMA3_8B
    if args.layers is not None:
        s = replace(s, layers=args.layers)
    if args.shards is not None:
        s = replace(s, shards=args.shards)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not what or set(what) - set(PARTS):
        ap.error(f"--what takes a comma-separated subset of {','.join(PARTS)}, not {args.what!r}")
    p = plan(s)
    if args.plan:
        print(json.dumps(p, indent=2))
        return p
    if args.out is None:
        ap.error("--out DIR is required (or --plan)")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = args.out
    todo = {w: out / w for w in PARTS if w in what and (args.overwrite or not done(w, out / w))}
    for w in sorted(set(what) - set(todo)):
        log(f"{out / w} exists, kept (--overwrite rebuilds it)")
    if not todo:
        return p
    out.mkdir(parents=True, exist_ok=True)
    need = sum(p["bytes"][w] for w in todo) + HEADROOM
    free = shutil.disk_usage(out).free + sum(du(d) for d in todo.values())  # old parts are removed first
    if free < need:
        raise SystemExit(f"make_8b: {out} has {free / 1e9:.1f} GB free (counting parts it would replace); "
                         f"{'+'.join(todo)} need {need / 1e9:.1f} GB with {HEADROOM >> 20} MiB to spare: "
                         f"free some space or choose another --out")
    tmp = {w: d.with_name(d.name + ".tmp") for w, d in todo.items()}
    for d in tmp.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    t0 = time.perf_counter()
    models = {w: d for w, d in tmp.items() if w != "adapter"}
    if models:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # the pool's threads already use the cores; BLAS threads would fight them
            write_models(s, models, args.seed, max(1, args.threads), log)
    if "adapter" in tmp:
        write_adapter(s, tmp["adapter"], args.seed)
    for w, d in todo.items():
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp[w], d)
    dt = time.perf_counter() - t0
    written = sum(p["bytes"][w] for w in todo)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    log(f"wrote {'+'.join(todo)} in {out}: {written / 1e9:.2f} GB in {dt:.1f} s ({written / 1e6 / dt:.0f} MB/s), "
        f"peak RSS {rss:.0f} MiB, {args.threads} threads")
    return {**p, "seconds": dt, "written": written, "peak_rss_mib": rss}


if __name__ == "__main__":
    main()
