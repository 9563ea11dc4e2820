"""Atomic writes, the one copy: a reader (or a crash) sees the old file or the complete new one, never half.

Every writer goes through ``atomic_path``: a temporary name in the destination folder, written, flushed to
disk, given the mode a plain ``open`` would give it (0o666 minus the umask; ``mkstemp`` alone leaves 0o600),
then renamed onto the destination with ``os.replace``. A failure removes the temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

STATE_KEY = "diffsamp_state"  # the safetensors metadata entry holding a file's JSON state (checkpoints)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(folder: str | os.PathLike) -> None:
    """Give every file below ``folder`` the mode a plain ``open`` would (0o666 minus the umask): libraries that
    write through ``mkstemp`` (diffusers' ``save_pretrained``) leave 0o600."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it (normal file mode, fsynced) if the block succeeds."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, *, fmt: str | None = None, what: str = "JSON file",
              error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; with ``fmt``, its ``"format"`` entry must be ``fmt`` (it is then ``what``).
    Invalid JSON or another format raise ``error`` naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except ValueError as exc:  # (UnicodeDecodeError included: random bytes)
        raise error(f"{path} is not valid JSON: {_first_line(exc)}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} is not {what}: it holds a JSON {type(obj).__name__}, not an object")
    if fmt is not None and (not isinstance(obj, dict) or obj.get("format") != fmt):
        found = obj.get("format") if isinstance(obj, dict) else None
        raise error(f"{path} is not {what} (format {found!r})")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safetensors_problem(path: str | os.PathLike, hint: str = "copy, download or export it again") -> str | None:
    """Why ``path`` is not a readable safetensors file (one line naming it), or None when its header is sound.

    The header check (``safe_open``) catches what a user meets: a truncated download or copy (the header
    promises more bytes than the file has), random bytes, an empty file, a missing or unreadable file."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
        return None
    except SafetensorError as exc:
        why = _first_line(exc).removeprefix("Error while deserializing header: ")
        if "not fully covered" in why:
            what = f"is truncated ({path.stat().st_size} bytes, fewer than its header lists)"
        elif "invalid header length" in why:
            what = f"is truncated or not a safetensors file (its header is longer than its {path.stat().st_size} bytes)"
        else:
            what = f"is not a safetensors file ({why})"
        return f"{path} {what}: {hint}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"


def check_safetensors(path: str | os.PathLike, hint: str = "copy, download or export it again") -> Path:
    """``path`` if it is a readable safetensors file; a ValueError naming the file and the problem otherwise."""
    problem = safetensors_problem(path, hint)
    if problem is not None:
        raise ValueError(problem)
    return Path(path)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with a damaged or missing file as a one-line ValueError naming it."""
    from safetensors.torch import load_file

    return load_file(str(check_safetensors(path)), device=device)


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (non-contiguous tensors are copied first: safetensors refuses views)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v if v.is_contiguous() else v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
    return Path(path).expanduser()


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write arrays as an uncompressed ``.npz`` atomically (``np.savez``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path).expanduser()


def save_state_file(path: str | os.PathLike, tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> Path:
    """Tensors plus a JSON ``state`` in the metadata (``STATE_KEY``), atomically: the training checkpoint form."""
    return save_safetensors(tensors, path, {STATE_KEY: json.dumps(state)})


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) of a file written by ``save_state_file``; ValueError for any other file."""
    from safetensors.torch import load_file, safe_open

    path = check_safetensors(path, "restore it from a copy, or delete it to start over")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if STATE_KEY not in meta:
        raise ValueError(f"{path} is not a diffsamp training checkpoint")
    try:
        state = json.loads(meta[STATE_KEY])
    except ValueError as exc:
        raise ValueError(f"{path}: its training state is not valid JSON ({_first_line(exc)})") from None
    return load_file(str(path)), state

