"""Hugging Face Hub ids as inputs: `org/name` (or `org/name@REV`) resolved to a snapshot folder of the Hub's
own cache, through huggingface_hub (which downloads what is missing, or only reads the cache when
HF_HUB_OFFLINE=1; HF_HOME and HF_HUB_CACHE choose the cache as they do for every Hugging Face library).

The rules, in order:
  1. a path that exists locally is that path, always;
  2. a string shaped like `org/name` (one "/", Hub repo-name characters, an optional `@REV`, not ending in a
     file suffix such as .safetensors) is a Hub model repository;
  3. a string shaped like `org/name/FILE` (FILE a file of the repository with a weights suffix, .safetensors,
     .gguf, .pt, .pth or .bin, in a subfolder or not; an optional `@REV`) is that one file: the single-file
     adapters (kohya, diffusers, ComfyUI, GGUF) and single-file bases the Hub is full of;
  4. anything else is left as it is, for the reader to report as a missing file.

Only the files loratool reads are fetched: a base's *.safetensors weights (top level, not the duplicate
consolidated*.safetensors some repos ship), its JSON configs and tokenizer files; a PEFT adapter's
adapter_config.json and adapter_model.safetensors. An adapter repository without adapter_config.json that holds
one single-file adapter (and is no model) is read as that file, fetched alone. huggingface_hub is imported only
when a Hub id is given, so `--help`, header reads and local paths never pay for it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..container import escape
from ..errors import FileError, UsageError

# Hub repo names: letters, digits, "-", "_", "."; no leading "-"/"." (huggingface_hub's validate_repo_id
# checks the rest and its refusal becomes the message).
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^@\s]+))?$")
# `org/name/FILE[@REV]`: one file of a repository (rule 3).
HUB_FILE = re.compile(rf"^(?P<repo>{_PART}/{_PART})/(?P<file>(?:{_PART}/)*{_PART}\.(?:safetensors|gguf|pt|pth|bin))"
                      r"(?:@(?P<rev>[^@\s]+))?$")
# A name ending in one of these is a file path that is missing, never a repository.
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf", ".json", ".npz", ".onnx")

PATTERNS = {
    "base": (["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt"],
             # safetensors in subfolders are other components (diffusers) or duplicate copies of the weights
             ["*/*.safetensors", "consolidated*.safetensors"]),
    "adapter": (["adapter_config.json", "adapter_model.safetensors"], None),
}


def _match(path, pattern: re.Pattern):
    """`pattern`'s match of `path` when it is a string (or os.PathLike) that is not a local path (rule 1) and
    names no ".." or "--" part (the Hub refuses both), else None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    if not isinstance(text, str) or os.path.lexists(text):
        return None
    m = pattern.match(text)
    return None if m is None or ".." in text or "--" in m["repo"] else m


def hub_id(path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` is a Hub id by the rules above, else None (it exists locally,
    or does not have the shape)."""
    m = _match(path, HUB_ID)
    if m is None or m["repo"].endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["rev"]


def hub_file(path) -> tuple[str, str, str | None] | None:
    """(repo id, file in it, revision or None) when `path` is a Hub file id `org/name/FILE[@REV]` that is not a
    local path, else None."""
    m = _match(path, HUB_FILE)
    return None if m is None else (m["repo"], m["file"], m["rev"])


def resolve(path, kind: str, revision: str | None = None):
    """The local path of `path`: itself unless it is a Hub id, else its snapshot folder in the Hub cache.

    Args:
        path: a local path (returned as it is) or a Hub id `org/name` / `org/name@REV`.
        kind: "base" (weights, configs, tokenizer) or "adapter" (a PEFT adapter's two files): the files fetched.
        revision: branch, tag or commit for a Hub id without its own `@REV` (default: main).
    Returns:
        `path` unchanged, or the snapshot folder (a Path); for an adapter repository without adapter_config.json,
        its one single-file adapter (`_single_adapter_file`).
    Raises:
        FileError: the repository, revision or files cannot be had: not in the cache while offline, not on the
            Hub, private, or the Hub unreachable; an adapter repository with no PEFT adapter and no single
            adapter file; one line saying which and what to do.
    """
    one = hub_file(path)
    if one is not None:
        repo, file, rev = one
        return Path(_file(repo, file, rev or revision))
    parsed = hub_id(path)
    if parsed is None:
        return path
    repo, rev = parsed
    rev = rev or revision
    folder = Path(_snapshot(repo, rev, kind))
    if kind == "adapter" and not (folder / "adapter_config.json").is_file():
        return Path(_file(repo, _single_adapter_file(repo, rev, folder), rev))
    return folder


# A repository without adapter_config.json that holds one single-file adapter is read as that file, as
# diffusers' load_lora_weights guesses a weight name: the files with an adapter suffix, less schedulers,
# optimizers and training checkpoints, and diffusers' own pytorch_lora_weights.safetensors first. A model
# repository (config.json, model_index.json) is never guessed into: its weights are a model, not an adapter.
_ADAPTER_SUFFIXES = (".safetensors", ".gguf")
_NOT_ADAPTERS = ("scheduler", "optimizer", "checkpoint")
_DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
_MODEL_CONFIGS = ("config.json", "model_index.json")


def _single_adapter_file(repo: str, rev: str | None, folder: Path) -> str:
    """The one adapter file of a repository without adapter_config.json (its path in the repository).

    Raises:
        FileError: the repository is a model, or holds no adapter file, or several; the line names them.
    """
    files = _repo_files(repo, rev, folder)
    found = sorted(f for f in files if f.endswith(_ADAPTER_SUFFIXES)
                   and not any(w in f.lower() for w in _NOT_ADAPTERS))
    model = [c for c in _MODEL_CONFIGS if c in files]
    if model:
        what = f"it is a model repository ({model[0]})"
    elif _DIFFUSERS_LORA in found:
        return _DIFFUSERS_LORA
    elif len(found) == 1:
        return found[0]
    elif found:
        listed = ", ".join(escape(f) for f in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        what = f"it holds {len(found)} adapter files: {listed}"
    else:
        what = "it holds no .safetensors or .gguf file"
    raise FileError(f"{repo}: the Hub repository holds no adapter_config.json (revision {rev or 'main'}), and "
                    f"{what}; name the adapter file in it: {repo}/FILE.safetensors (a single-file adapter: kohya, "
                    "diffusers, ComfyUI, GGUF, ...)")


def _repo_files(repo: str, rev: str | None, folder: Path) -> set[str]:
    """The files of a repository at a revision: listed by the Hub, or offline those of its cached snapshot."""
    if _offline():
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return set(_hub_call(repo, rev, lambda hf, offline, cache_dir: hf.list_repo_files(repo, revision=rev)))


def resolve_all(items, revision: str | None = None) -> list:
    """`resolve` for several (path, kind) pairs, refusing a `revision` that no Hub id uses.

    Raises:
        UsageError: `revision` is set and no item is a Hub id (it would be ignored).
        FileError: as `resolve`.
    """
    items = list(items)
    if revision is not None and not any(hub_id(p) is not None or hub_file(p) is not None for p, _ in items):
        raise UsageError(f"--revision {escape(revision)}: no input is a Hugging Face Hub id (org/name) that is not "
                         "a local path; drop the option")
    return [resolve(p, kind, revision) for p, kind in items]


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, when it is first imported)."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE or (now is not None and now.strip().upper() in ("1", "ON", "YES", "TRUE"))


def _file(repo: str, file: str, revision: str | None) -> str:
    """huggingface_hub.hf_hub_download of one file of a repository, its errors as one FileError line."""
    return _hub_call(repo, revision, lambda hf, offline, cache_dir: hf.hf_hub_download(
        repo, file, revision=revision, local_files_only=offline, cache_dir=cache_dir), what=file)


def _snapshot(repo: str, revision: str | None, kind: str) -> str:
    """huggingface_hub.snapshot_download of the files `kind` needs, its errors as one FileError line."""
    allow, ignore = PATTERNS[kind]
    return _hub_call(repo, revision, lambda hf, offline, cache_dir: hf.snapshot_download(
        repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore, local_files_only=offline,
        cache_dir=cache_dir))


def _hub_call(repo: str, revision: str | None, call, what: str | None = None) -> str:
    """call(huggingface_hub, offline, cache_dir), with huggingface_hub's errors as one FileError line each."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub import utils as errors  # these three live here from 0.24 to 2.x
    except ImportError:
        raise FileError(f"{repo}: is not a local path, and reading it from the Hugging Face Hub needs "
                        "huggingface_hub; pip install huggingface_hub, or pass a local path") from None
    offline = _offline()
    # HF_HUB_CACHE, the variable that overrides every other cache setting, as set now (huggingface_hub reads
    # it when first imported); None leaves the choice (HF_HOME, ...) to huggingface_hub.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    shown = f"{repo} (revision {revision or 'main'})" + (f", file {what}" if what else "")
    name = f"{repo}/{what}" if what else repo  # what the user typed, less its @REV
    try:
        return call(huggingface_hub, offline, cache_dir)
    except errors.RevisionNotFoundError:
        raise FileError(f"{repo}: the Hugging Face Hub repository has no revision \"{escape(revision or 'main')}\"; "
                        "pass an existing branch, tag or commit with --revision") from None
    except errors.RepositoryNotFoundError:
        raise FileError(f"{repo}: is neither a local path nor a Hugging Face Hub repository you can read (not "
                        "found, private or gated: check the name, or log in with `hf auth login`)") from None
    except errors.LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        where = f"revision {revision or 'main'} in the Hub cache {cache}"
        try:  # huggingface_hub >= 2: a cached snapshot its tree listing says is missing files
            from huggingface_hub.errors import IncompleteSnapshotError
        except ImportError:
            IncompleteSnapshotError = ()
        if isinstance(e, IncompleteSnapshotError):
            why = f"its {where} is incomplete, and the Hub cannot be reached"
        elif offline:
            why = f"nor is its {where}, and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            why = f"nor is its {where}, and the Hub cannot be reached"
        raise FileError(f"{name}: is not a local path, {why}; download it once online (`hf download "
                        f"{repo}{' ' + what if what else ''}`), or pass a local path") from None
    except getattr(errors, "EntryNotFoundError", ()):  # online: a file the repository does not have
        raise FileError(f"{name}: is not a local path, and the Hugging Face Hub repository {repo} has no file "
                        f"{escape(what or '')} (revision {revision or 'main'}); check the file name") from None
    except Exception as e:  # noqa: BLE001 - network and validation errors of another library: one line, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FileError(f"{name}: is not a local path, and fetching {shown} from the Hugging Face Hub failed: "
                        f"{escape(first)}") from None


__all__ = ["hub_id", "hub_file", "resolve", "resolve_all", "PATTERNS"]
