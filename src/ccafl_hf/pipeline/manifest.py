"""Files that prove what they hold: blake2b content hashes, manifests written last, atomic writes, write errors."""

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


def file_digest(path: str | os.PathLike) -> str:
    """blake2b (32 bytes, hex) of a file's content, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def json_digest(payload: Any) -> str:
    """blake2b of a JSON-ready value (sorted keys)."""
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=32).hexdigest()


def cached_digests(paths: list[str], check: Callable[[str], None] | None = None) -> list[str]:
    """`file_digest` of input files, cached by path, size, mtime and inode; ``check(path)`` on each hashed anew."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    store = cache_dir("hashes", f"{short_hash({'root': root})}.json")
    cached = read_json(store)
    cached, digests, changed = cached if isinstance(cached, dict) else {}, [], False
    for path in paths:
        stat, key = os.stat(path), os.path.relpath(os.path.abspath(path), root)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        if not (isinstance(cached.get(key), list) and len(cached[key]) == 4 and cached[key][:3] == stamp):
            if check is not None:
                check(path)
            cached[key], changed = [*stamp, file_digest(path)], True
        digests.append(cached[key][3])
    if changed:
        try:
            write_json(store, cached)
        except OSError:  # an unwritable cache only costs the next run the hashing
            logger.info("could not write the hash cache %s", store)
    return digests


def remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(temp)`` beside ``path``, renamed to ``path``: the old file or the whole new one, no temporary left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        remove(temp)
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


def write_manifest(folder: str | os.PathLike, payload: dict[str, Any], files: Iterable[Path] | None = None,
                   name: str = MANIFEST) -> dict:
    """Write ``folder/<name>``, last: ``payload`` and the hash of each of ``files`` (default: the folder's)."""
    folder = Path(folder)
    if files is None:
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                 and not any(part.startswith(TEMP_PREFIX) for part in p.relative_to(folder).parts)]
    content = {"format": FORMAT, **payload,
               "files": {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(files)}}
    write_json(folder / name, content)
    return content


def verify_manifest(folder: str | os.PathLike, require: Iterable[str] = (),
                    manifest: str = MANIFEST) -> tuple[dict | None, str]:
    """``(manifest, "")`` if every listed file (and each of ``require``) has its hash, else ``(None, why)``."""
    folder = Path(folder)
    content = read_json(folder / manifest)
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("files"), dict):
        return None, f"no readable {manifest} (cut off while being written, or not written by this version)"
    files = content["files"]
    for name in dict.fromkeys([*require, *files]):
        if name not in files or not (folder / name).is_file():
            return None, f"{name} is missing"
        if file_digest(folder / name) != files[name]:
            return None, f"{name} does not match its manifest (cut off or changed)"
    return content, ""


def describe_write_error(error: BaseException, where: str | os.PathLike, needed: int = 0) -> str | None:
    """``cannot write PATH: no space left on the device (about N MB needed, M MB free)`` for a failed write
    (an OSError, torch.save's RuntimeError or safetensors' SafetensorError); None for any other error."""
    text = str(error)
    if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                                           errno.EROFS, errno.EFBIG)
            or isinstance(error, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text)
            or type(error).__name__ == "SafetensorError" and ("IoError" in text or "os error" in text)):
        return None
    where = getattr(error, "filename", None) or where
    full = not isinstance(error, OSError) or not error.strerror or error.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on the device" if full else error.strerror
    return f"cannot write {where}: {reason} ({_space(where, needed)[1]})"


def ensure_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise `RunError` (one line naming ``folder`` and the bytes) when ``what`` needs more than is free."""
    free, text = _space(folder, needed)
    if free is not None and free < needed:
        raise RunError(f"cannot write {what} to {folder}: no space left on the device ({text})")


def _space(where: str | os.PathLike, needed: int) -> tuple[int | None, str]:
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
        text = f"{free / 1e6:.1f} MB ({free} bytes) free"
    except OSError:
        free, text = None, "free space unknown"
    return free, f"about {needed / 1e6:.1f} MB ({needed} bytes) needed, {text}" if needed > 0 else text
