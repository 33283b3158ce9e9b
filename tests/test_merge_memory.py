"""merge reads an adapter one target at a time: it plans from the adapter's structure, each target's factors
are read from the file when its tensor is merged and dropped after, so peak memory does not grow with the
adapter's size. A file changed under the merge, or a bad factor found only when read, still leaves nothing."""

from __future__ import annotations

import gc
import os
import re
import weakref

import numpy as np
import pytest
import torch

from builders import linear_target, rand
from loratool.adapter import Adapter
from loratool.container import write_file
from loratool.errors import FileError, SpecError
from loratool.io import _common, kohya, peft
from loratool.io.native import save
from loratool.tasks.merge import merge as run_merge

N_TARGETS = 8


def _case(tmp_path, to="loratool"):
    """A base of N_TARGETS linear tensors and one adapter on all of them, written in dialect `to`."""
    import loratool

    targets = [linear_target(key=f"layers.{i}.q_proj.weight", seed=i) for i in range(N_TARGETS)]
    base = {t.key: rand(12, 10, seed=100 + i) for i, t in enumerate(targets)}
    write_file(tmp_path / "base.safetensors", base, {})
    out = tmp_path / ("a.safetensors" if to != "peft" else "a")
    loratool.save(Adapter({t.key: t for t in targets}), out, to=to)
    return tmp_path / "base.safetensors", out, targets, base


@pytest.mark.parametrize("to", ["loratool", "peft", "kohya"])
def test_merge_holds_one_targets_factors_at_a_time(tmp_path, monkeypatch, to):
    """Every read of the adapter's file reads one target's factors, and by then the factors of every target
    read before are gone (one worker thread: the merge's own references are all that could keep them)."""
    base, ad, targets, W = _case(tmp_path, to)
    reads, alive = [], []
    real = _common.safetensors_reader

    def counting_reader(path, hdr):
        read = real(path, hdr)

        def wrapped(names):
            gc.collect()
            reads.append((sorted(names or ()), sum(r() is not None for r in alive)))
            arrays = read(names)
            alive.extend(weakref.ref(a) for a in arrays.values())
            return arrays

        return wrapped

    for module in (_common, peft, kohya):
        monkeypatch.setattr(module, "safetensors_reader", counting_reader)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one worker: targets are merged one after another
    out = tmp_path / "o.safetensors"
    run_merge(base, [ad], out, verify=True)
    factor_reads = [r for r in reads if r[0]]
    assert len(factor_reads) == N_TARGETS, reads  # one read per target, none of the whole file
    assert all(len(names) == 2 for names, _ in factor_reads)  # A and B of one target
    assert all(live == 0 for _, live in factor_reads), reads  # nothing read before is still held
    from safetensors.torch import load_file

    got = load_file(out)
    for t in targets:
        b = t.blocks[0]
        assert torch.allclose(got[t.key], W[t.key] + (b.B @ b.A) * b.scale, rtol=0, atol=1e-5)  # float32 sums


def test_peak_memory_does_not_grow_with_the_adapter(tmp_path):
    """tracemalloc peak of merging a one-target adapter and a 16-target one into bases of the same tensor
    sizes: the factors of 15 more targets (15 x 1.4 MB float32) must not show up in the peak."""
    import tracemalloc

    def peak(n):
        d = tmp_path / str(n)
        d.mkdir()
        targets = [linear_target(key=f"l.{i}.weight", out=384, inp=384, rank=480, seed=i) for i in range(n)]
        write_file(d / "b.safetensors", {t.key: rand(384, 384, seed=i) for i, t in enumerate(targets)}, {})
        save(Adapter({t.key: t for t in targets}), d / "a.safetensors")
        gc.collect()
        tracemalloc.start()
        try:
            run_merge(d / "b.safetensors", [d / "a.safetensors"], d / "o.safetensors", fsync=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    one_target = (384 + 384) * 480 * 4  # bytes of one target's float32 factors
    small, big = peak(1), peak(16)
    # Up to 4 workers may each hold one target; the whole adapter would be 16 targets' worth more.
    assert big - small < 4 * one_target, (small, big)


def test_adapter_rewritten_during_the_merge_is_refused(tmp_path, monkeypatch):
    """The adapter's file is pinned when its header is read: a target read after the file was rewritten in
    place is refused, nothing is written."""
    base, ad, targets, _ = _case(tmp_path)
    real = _common.safetensors_reader

    def rewriting_reader(path, hdr):
        read = real(path, hdr)
        calls = []

        def wrapped(names):
            calls.append(names)
            if len(calls) == 2:  # after the first target: write the file in place (same inode, new mtime)
                with open(path, "r+b") as f:
                    f.seek(-4, 2)
                    f.write(b"\0\0\0\0")
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            return read(names)

        return wrapped

    monkeypatch.setattr(_common, "safetensors_reader", rewriting_reader)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    out = tmp_path / "o.safetensors"
    with pytest.raises(FileError, match=re.escape("a.safetensors: changed while it was being read")):
        run_merge(base, [ad], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base.safetensors"]


def test_non_finite_factor_found_when_read_leaves_nothing(tmp_path):
    """A native file's value rule (T006) is checked as each target is read; the merge then stops and removes
    its temporary output, with the same message as an eager read."""
    from loratool import spec
    from loratool.io.native import load, metadata_of, tensors_of

    base, ad, targets, _ = _case(tmp_path)
    a = load(ad)
    tensors = tensors_of(a)
    name = spec.factor_name(targets[-1].key, 0, "A")
    tensors[name] = np.array(tensors[name])
    tensors[name][0, 0] = np.nan
    write_file(ad, tensors, metadata_of(a))
    message = f'tensor "{name}" has 1 non-finite values (rule T006)'
    with pytest.raises(SpecError, match=re.escape(message)):
        load(ad)
    with pytest.raises(SpecError, match=re.escape(message)):
        run_merge(base, [ad], tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base.safetensors"]
