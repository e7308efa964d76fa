"""Files that prove what they hold: streamed content hashes, manifests written last, atomic writes, and
one line for a failed write (full disk, no permission).

A folder (a stage's results, a checkpoint, the finished run) *exists* only when its ``manifest.json``
exists, lists every file it consists of with its blake2b hash, and every listed file still hashes to
it (`verify_manifest`). The manifest is written after the files, atomically: a folder cut off by a
kill, a truncated or replaced file, or a deleted one fails verification and is redone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from ..cache import fingerprint as short_hash
from .setup import RunError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
FORMAT = "ccafl-hf-run/2"
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------- hashes
def file_digest(path: str | os.PathLike) -> str:
    """blake2b (32 bytes, hex) of a file's content, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def json_digest(payload: Any) -> str:
    """blake2b of a JSON-ready value (sorted keys)."""
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=32).hexdigest()


def cached_digests(paths: list[str], check: Callable[[str], None] | None = None) -> list[str]:
    """Content hashes of input files (the data, the start model), cached in the package's cache under
    ``hashes/`` keyed by path, size, mtime and inode, so a rerun does not re-read a large dataset.

    ``check(path)`` (e.g. an image header check) runs on every file that is hashed anew; a file whose
    hash comes from the cache passed it when it was hashed.
    """
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    store = cache_dir("hashes", f"{short_hash({'root': root})}.json")
    try:
        cached = json.loads(store.read_text())
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    digests, changed = [], False
    for path in paths:
        stat = os.stat(path)
        key = os.path.relpath(os.path.abspath(path), root)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = cached.get(key)
        if not (isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp):
            if check is not None:
                check(path)
            entry, changed = [*stamp, file_digest(path)], True
            cached[key] = entry
        digests.append(entry[3])
    if changed:
        try:
            write_json(store, cached)
        except (OSError, RunError):  # an unwritable cache only costs the next run the hashing
            logger.info("could not write the hash cache %s", store)
    return digests


# ------------------------------------------------------------------------------------ atomic files
def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temp)`` on a temporary name in ``path``'s folder, then rename it to ``path``: a reader
    sees the old file or the whole new one. A failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`write_atomically` a JSON document."""
    text = json.dumps(payload, indent=2)
    return write_atomically(path, lambda temp: temp.write_text(text))


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON content of ``path``; None when it is missing, cut off or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- manifests
def folder_files(folder: Path) -> list[Path]:
    """Every file of ``folder`` (recursively) but its manifest and temporary files."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(TEMP_PREFIX) for part in p.relative_to(folder).parts))


def write_manifest(folder: str | os.PathLike, payload: dict[str, Any], files: Iterable[Path] | None = None,
                   name: str = MANIFEST) -> dict:
    """Hash ``files`` (default: every file of ``folder``) and write ``folder/<name>`` last, holding
    ``payload`` and ``{"files": {relative path: hash}}``. Returns the manifest."""
    folder = Path(folder)
    listed = folder_files(folder) if files is None else sorted(files)
    content = {"format": FORMAT, **payload,
               "files": {p.relative_to(folder).as_posix(): file_digest(p) for p in listed}}
    write_json(folder / name, content)
    return content


def verify_manifest(folder: str | os.PathLike, require: Iterable[str] = (),
                    manifest: str = MANIFEST) -> tuple[dict | None, str]:
    """``(manifest, "")`` when ``folder/manifest`` is readable and every listed file (and each of
    ``require``) is present with its hash; else ``(None, why)`` — a short phrase for the log line."""
    folder = Path(folder)
    content = read_json(folder / manifest)
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("files"), dict):
        return None, f"no readable {manifest} (cut off while being written, or not written by this version)"
    files = content["files"]
    for name in require:
        if name not in files:
            return None, f"{name} is missing"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if file_digest(path) != digest:
            return None, f"{name} does not match its manifest (cut off or changed)"
    return content, ""


# -------------------------------------------------------------------------------------- write errors
def is_write_failure(error: BaseException) -> bool:
    """A full disk, a quota or a folder that cannot be written, whatever library reported it (OSError,
    torch.save's RuntimeError, safetensors' SafetensorError)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)
    text = str(error)
    return ((isinstance(error, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text))
            or (type(error).__name__ == "SafetensorError" and ("IoError" in text or "os error" in text)))


def describe_write_failure(error: BaseException, where: str | os.PathLike, needed: int) -> str:
    """``cannot write PATH: no space left on the device (N MB needed, M MB free)`` for a `is_write_failure`."""
    where = getattr(error, "filename", None) or where
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              and error.errno not in (errno.ENOSPC, errno.EDQUOT) else "no space left on the device")
    return f"cannot write {where}: {reason} ({_space(where, needed)})"


def describe_write_error(error: BaseException, output_dir: str | os.PathLike) -> str | None:
    """`describe_write_failure` without a size, or None when ``error`` is no failed write."""
    return describe_write_failure(error, output_dir, 0) if is_write_failure(error) else None


def _space(where: str | os.PathLike, needed: int) -> str:
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{_mb(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    return f"about {_mb(needed)} needed, {free}" if needed > 0 else free


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB ({size} bytes)"


def ensure_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise `RunError` (one line naming ``folder`` and the bytes) when the device holding ``folder`` has
    fewer than ``needed`` bytes free, before ``what`` is written."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise RunError(f"cannot write {what} to {folder}: no space left on the device ({_space(probe, needed)})")


__all__ = ["MANIFEST", "cached_digests", "describe_write_error", "describe_write_failure", "ensure_space", "file_digest", "folder_files",
           "is_write_failure", "json_digest", "read_json", "verify_manifest", "write_atomically", "write_json",
           "write_manifest"]
