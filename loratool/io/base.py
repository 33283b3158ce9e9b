"""Lazy readers for base models: a torch .pt/.pth/.bin state dict, a .safetensors file, or a Hugging Face
folder (sharded `model.safetensors.index.json`, single `model.safetensors`, or `pytorch_model.bin`), or a
diffusers model folder (`diffusion_pytorch_model.safetensors`, sharded with its `.index.json`).

Shapes and dtypes come from headers; tensors are read one at a time with pread, so a model never sits
in memory whole. torch files load with `weights_only=True` and nothing else, ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .. import spec
from ..container import (Header, TensorInfo, escape, pread_exact, read_array, read_header, read_json_file,
                         require_regular)
from ..errors import FileError, SpecError, os_error_message

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
INDEX_NAME = "model.safetensors.index.json"
# A diffusers model folder (unet/, transformer/, vae/ of a pipeline) names its weights this way.
DIFFUSERS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = DIFFUSERS_NAME + ".index.json"


class BaseModel:
    """Read-only access to the tensors of a base model, by full key."""

    path: Path
    files: list[Path]  # every file this base reads (for the output-is-not-an-input guard)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> tuple[tuple[int, ...], str] | None:
        """(shape, safetensors dtype name), or None when the key is not in the base."""
        raise NotImplementedError

    def read(self, key: str):
        """The tensor, as a numpy array (ml_dtypes for BF16 and FP8)."""
        raise NotImplementedError

    def sha256(self, key: str) -> str:
        return hashlib.sha256(_bytes(self.read(key))).hexdigest()

    @contextlib.contextmanager
    def mapped(self, key: str, start: int = 0, stop: int | None = None):
        """Elements [start, stop) of the flattened tensor as a read-only numpy array for the duration of the
        block, without a copy where the reader can map the file (a view of the tensor it holds otherwise)."""
        yield self.read(key).reshape(-1)[start:stop]

    def check_unchanged(self) -> None:
        """Refuse a base whose files changed since they were opened (written in place, truncated, replaced): call
        it after the last read, before an output made from it is published.

        Raises:
            FileError: a file's size, modification time or identity differs from when it was opened.
        """

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_reader(obj) -> bool:
    """Whether `obj` is an open base reader: a BaseModel, or an object with its reading methods (a view of one
    made elsewhere, such as ops.quant's dequantized view of a quantized base)."""
    return isinstance(obj, BaseModel) or all(callable(getattr(obj, m, None)) for m in ("keys", "info", "mapped"))


class SafetensorsBase(BaseModel):
    """One .safetensors file, read with pread; the header is checked like an adapter's container."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = [self.path]
        self.header: Header = read_header(self.path)
        errs = self.header.errors
        if errs:
            raise SpecError(f"{self.path}: {errs[0].message} (rule {errs[0].rule})", errs)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pin = _identity(os.fstat(self._fd))

    def keys(self):
        return list(self.header.tensors)

    def check_unchanged(self) -> None:
        _check_pin(self.path, self._pin, os.fstat(self._fd))

    def tensor_info(self, key: str) -> TensorInfo | None:
        return self.header.tensors.get(key)

    def info(self, key):
        t = self.header.tensors.get(key)
        return None if t is None else (t.shape, t.dtype)

    def read(self, key):
        return read_array(self._fd, self.header.data_start, self.header.tensors[key])

    def raw(self, key) -> bytearray:
        t = self.header.tensors[key]
        return pread_exact(self._fd, t.nbytes, self.header.data_start + t.begin)

    def sha256(self, key):
        return hashlib.sha256(self.raw(key)).hexdigest()

    @contextlib.contextmanager
    def mapped(self, key, start: int = 0, stop: int | None = None):
        """A read-only mapping of elements [start, stop) of this tensor alone, seen as a flat numpy array: pages
        come from the page cache as they are touched, with no copy (a pread of each piece costs a copy of every
        byte), and the mapping is closed when the block ends, so the resident set holds only the window in use."""
        import mmap

        from ..dtypes import from_buffer

        t = self.header.tensors[key]
        size = spec.DTYPE_SIZES[t.dtype]
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:
            raise ValueError(f"mapped: elements [{start}, {stop}) outside tensor of {t.numel}")
        nbytes = (stop - start) * size
        if nbytes == 0:
            yield from_buffer(b"", t.dtype, (0,))
            return
        first = self.header.data_start + t.begin + start * size
        lo = first - first % mmap.ALLOCATIONGRANULARITY
        if self.header.data_start + t.end > os.fstat(self._fd).st_size:
            raise FileError(f"{self.path}: is shorter than its header says; was it modified while reading?")
        length = first + nbytes - lo
        populate = getattr(mmap, "MAP_POPULATE", None)  # Linux
        if populate is not None:
            # The window is read whole right away: one call maps its pages, instead of a fault per few pages
            # (about 15% of extract's reading on the 1.1B pair, benchmarks/README.md).
            mm = mmap.mmap(self._fd, length, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ, offset=lo)
        else:
            mm = mmap.mmap(self._fd, length, access=mmap.ACCESS_READ, offset=lo)
        try:
            with contextlib.suppress(AttributeError, OSError):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)[first - lo:first - lo + nbytes]
            arr = from_buffer(view, t.dtype, (stop - start,))
            try:
                yield arr
            finally:
                del arr
                with contextlib.suppress(BufferError):
                    view.release()
        finally:
            # An array the caller still holds keeps the mapping alive; it is unmapped when that array goes.
            with contextlib.suppress(BufferError):
                mm.close()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedBase(BaseModel):
    """A Hugging Face folder with `model.safetensors.index.json` (or diffusers'
    `diffusion_pytorch_model.safetensors.index.json`, `index_name`) and its shards."""

    def __init__(self, folder, index_name: str = INDEX_NAME):
        self.path = Path(folder)
        self.index_name = index_name
        index_path = self.path / index_name
        index = read_json_file(index_path, index_name)
        try:
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (KeyError, TypeError):
            raise SpecError(f"{index_path}: not a JSON object with a \"weight_map\" of key -> shard file name") \
                from None
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            # A shard is a plain file name inside the folder: no separators, no "..", nothing absolute.
            if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
                raise SpecError(f"{index_path}: shard \"{escape(name)}\" is not a file name inside the folder")
            if not (self.path / name).is_file():
                raise FileError(f"{index_path}: shard \"{escape(name)}\" is missing from {self.path}")
        self.index = index
        self.shards = {name: SafetensorsBase(self.path / name) for name in shard_names}
        self.files = [index_path] + [s.path for s in self.shards.values()]
        self._where = {}
        for key, name in weight_map.items():
            if self.shards[name].info(key) is None:
                raise SpecError(f"{index_path}: \"{escape(key)}\" is mapped to {escape(name)}, which lacks it")
            self._where[key] = self.shards[name]

    def keys(self):
        return list(self._where)

    def shard_of(self, key: str) -> SafetensorsBase:
        return self._where[key]

    def info(self, key):
        s = self._where.get(key)
        return None if s is None else s.info(key)

    def read(self, key):
        return self._where[key].read(key)

    def mapped(self, key, start: int = 0, stop: int | None = None):
        return self._where[key].mapped(key, start, stop)

    def sha256(self, key):
        return self._where[key].sha256(key)

    def check_unchanged(self) -> None:
        for s in self.shards.values():
            s.check_unchanged()

    def close(self):
        for s in self.shards.values():
            s.close()


class TorchBase(BaseModel):
    """A torch state dict file, loaded with weights_only=True (memory-mapped when the file allows)."""

    def __init__(self, path):
        import torch

        self.path = Path(path)
        self.files = [self.path]
        self._pin = _identity(os.stat(self.path))
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                # Legacy (non-zip) files cannot be memory-mapped; the load stays weights_only.
                if "mmap" not in str(e):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise FileError(f"{self.path}: cannot read: {os_error_message(e)}") from None
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"{self.path}: not a weights-only torch state dict ({escape(first[:200])})") from None
        if not isinstance(obj, dict) or not obj:
            raise SpecError(f"{self.path}: holds a {type(obj).__name__}, not a dict of tensors")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise SpecError(f"{self.path}: entry {escape(repr(bad[0]))} is not a tensor; expected a flat state dict")
        self._sd = obj

    def keys(self):
        return list(self._sd)

    def info(self, key):
        from ..dtypes import st_name

        t = self._sd.get(key)
        return None if t is None else (tuple(t.shape), st_name(t.dtype))

    def shared_keys(self) -> list[list[str]]:
        """Groups of keys (each sorted, two or more) that are one tensor: the same storage, offset, shape and
        stride, as `state_dict()` saves tied weights."""
        groups: dict[tuple, list[str]] = {}
        for k, t in self._sd.items():
            if t.numel():
                groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                                   t.dtype), []).append(k)
        return sorted(sorted(g) for g in groups.values() if len(g) > 1)

    def read(self, key):
        from ..dtypes import from_torch

        return from_torch(self._sd[key])  # a view of torch's (memory-mapped) storage, no copy

    def check_unchanged(self) -> None:
        try:
            now = os.stat(self.path)
        except OSError as e:
            raise FileError(f"{self.path}: cannot read: {os_error_message(e)}") from None
        _check_pin(self.path, self._pin, now)


def _identity(st) -> tuple:
    """What changes when a file is written, truncated or replaced: device, inode, size, modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_pin(path, pinned: tuple, now) -> None:
    if _identity(now) != pinned:
        raise FileError(f"{path}: changed while it was being read (written, truncated or replaced); nothing was "
                        "written; run again once it is complete")


def _bytes(a) -> memoryview:
    """The little-endian bytes of a numpy array, flat (a view when it is contiguous)."""
    import numpy as np

    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


# transformers' model classes by name ending -> PEFT's task_type (what AutoPeftModelFor* checks).
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
              "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
              "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def task_type_of(model_path) -> str | None:
    """PEFT's task_type for a Hugging Face model folder, from `architectures` in its config.json (None when
    the folder has no config or the architecture names no task PEFT knows)."""
    from ..errors import LoraToolError

    folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    try:
        cfg = read_json_file(folder / "config.json", "config.json")
    except LoraToolError:
        return None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    for arch in archs if isinstance(archs, list) else []:
        for ending, task in TASK_TYPES.items():
            if isinstance(arch, str) and arch.endswith(ending):
                return task
    return None


def open_base(path) -> BaseModel:
    """Open a base model by its path, choosing the reader from the file name or folder contents; a Hugging
    Face Hub id (`org/name`, not a local path) is its snapshot in the Hub cache (io.hub.resolve).

    Raises:
        FileError: the path does not exist or a shard is missing.
        SpecError: the file or folder is not a base model loratool can read.
    """
    from .hub import resolve

    p = Path(resolve(path, "base"))
    if not p.exists():
        raise FileError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return ShardedBase(p)
        if (p / "model.safetensors").is_file():
            return SafetensorsBase(p / "model.safetensors")
        if (p / "pytorch_model.bin").is_file():
            return TorchBase(p / "pytorch_model.bin")
        if (p / DIFFUSERS_INDEX_NAME).is_file():
            return ShardedBase(p, DIFFUSERS_INDEX_NAME)
        if (p / DIFFUSERS_NAME).is_file():
            return SafetensorsBase(p / DIFFUSERS_NAME)
        raise SpecError(f"{p}: folder has neither {INDEX_NAME}, model.safetensors, pytorch_model.bin nor a diffusers "
                        f"{DIFFUSERS_NAME}; pass the model folder (a pipeline's unet/ or transformer/)")
    if p.suffix == ".safetensors":
        return SafetensorsBase(p)
    if p.suffix in TORCH_SUFFIXES:
        require_regular(p, "torch state dict")
        return TorchBase(p)
    raise SpecError(f"{p}: unknown base format; use .safetensors, .pt, .pth, .bin or a Hugging Face folder")
