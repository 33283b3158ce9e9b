"""Tiny adapters and bases made in code with fixed seeds (no downloads)."""

from __future__ import annotations

import torch

from loratool.adapter import Adapter, Block, Target, whole_target


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def linear_target(key="layers.0.q_proj.weight", out=12, inp=10, rank=3, alpha=6.0, rule="standard", seed=0,
                  dtype=torch.float32):
    return whole_target(key, "linear", (out, inp), rand(rank, inp, seed=seed, dtype=dtype),
                        rand(out, rank, seed=seed + 1, dtype=dtype), alpha, rule)


def fused_target(key="h.0.attn.c_attn.weight", d=8, rank=2, alpha=4.0, seed=10):
    """loralib enable_lora=[True, False, True] on a fan_in_fan_out fused qkv: W stored (in, 3*d)."""
    blocks = (
        Block(rank, alpha, "standard", (0, d), (0, d), rand(rank, d, seed=seed), rand(d, rank, seed=seed + 1)),
        Block(rank, alpha, "standard", (2 * d, 3 * d), (0, d), rand(rank, d, seed=seed + 2),
              rand(d, rank, seed=seed + 3)),
    )
    return Target(key=key, layout="fan_in_fan_out", shape=(d, 3 * d), blocks=blocks)


def conv_target(key="unet.conv_in.weight", out=6, inp=4, k=3, rank=2, alpha=2.0, seed=20):
    return whole_target(key, "conv", (out, inp, k, k), rand(rank, inp * k * k, seed=seed),
                        rand(out, rank, seed=seed + 1), alpha)


def full_target(key="layers.0.norm.weight", n=12, scale=1.0, seed=30):
    return Target(key=key, kind="full", layout="full", shape=(n,), delta=rand(n, seed=seed), delta_scale=scale)


def sample_adapter() -> Adapter:
    ts = [linear_target(), linear_target("layers.0.v_proj.weight", rule="rslora", seed=4), fused_target(),
          conv_target(), full_target()]
    return Adapter(targets={t.key: t for t in ts}, metadata={"note": "sample"})


def torch_delta(t) -> torch.Tensor:
    """ops.linalg.delta_tensor (a numpy array) as a torch tensor, for comparisons with torch oracles."""
    from loratool.ops.linalg import delta_tensor

    return torch.from_numpy(delta_tensor(t))


def as_numpy_target(t: Target) -> Target:
    """The target with its factors (or full delta) as numpy arrays (ml_dtypes for bfloat16): how readers hold them."""
    from dataclasses import replace

    from loratool.dtypes import from_torch

    if t.kind == "full":
        return replace(t, delta=from_torch(t.delta))
    return t.with_blocks(replace(b, A=from_torch(b.A), B=from_torch(b.B)) for b in t.blocks)


def as_numpy_adapter(a: Adapter) -> Adapter:
    """The adapter with numpy factors (see as_numpy_target)."""
    return a.replace_targets(as_numpy_target(t) for t in a)
