"""Files are the user's: every writer of sbpet goes through this module.

- :func:`atomic_write` / :func:`write_json` / :func:`write_text`: a temporary file with a unique name
  in the target's own folder, flushed and fsync'ed, then ``os.replace``: a reader (or a crash) sees
  the old file or the new one, never half of one.
- :func:`remove_owned`: delete a folder sbpet made, only when everything in it is something sbpet
  writes there; anything else stops it with an error naming the foreign file.
- :func:`folder_lock`: one lock file per folder sbpet writes into (``filelock``), so two processes
  never write the same g or checkpoint at once.
- :func:`file_digest` / :func:`digest`: content keys for caches (a moved copy hits, a changed
  folder misses).

Nothing here reads a pickle.

Example:
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> write_json(os.path.join(folder, "a.json"), {"x": 1})
    >>> sorted(os.listdir(folder))
    ['a.json']
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile

__all__ = [
    "atomic_write", "write_json", "write_text", "remove_owned", "foreign_entries", "folder_lock",
    "LockBusy", "file_digest", "digest", "LOCK_SUFFIX",
]

LOCK_SUFFIX = ".lock"
_FULL_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed whole; larger ones by a sample
_SAMPLE_CHUNKS, _CHUNK = 64, 64 * 2**10


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """Open a temporary file beside ``path`` (same folder, unique name) for writing; when the
    block ends without an error it is flushed, fsync'ed and moved onto ``path`` with
    ``os.replace``; on an error it is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.txt")
        >>> with atomic_write(path) as f:
        ...     _ = f.write("whole")
        >>> open(path).read()
        'whole'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def write_json(path: str | os.PathLike, value, **dump_options) -> None:
    """``json.dump(value)`` to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path) as f:
        json.dump(value, f, **dump_options)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)


def foreign_entries(folder: str | os.PathLike, allowed: tuple[str, ...]) -> list[str]:
    """The paths under ``folder`` (relative, ``/``-separated) that match none of the ``allowed``
    glob patterns; a sub-folder is looked into when ``"<name>/"`` matches a pattern, otherwise
    it counts as one foreign entry. Example: ``allowed=("*.json", "engine/", "engine/*")``."""
    folder = os.fspath(folder)
    foreign = []

    def walk(relative: str) -> None:
        here = os.path.join(folder, relative) if relative else folder
        for name in sorted(os.listdir(here)):
            rel = f"{relative}/{name}" if relative else name
            full = os.path.join(here, name)
            if os.path.isdir(full) and not os.path.islink(full):
                if any(fnmatch.fnmatchcase(rel + "/", p) for p in allowed):
                    walk(rel)
                else:
                    foreign.append(rel + "/")
            elif not any(fnmatch.fnmatchcase(rel, p) for p in allowed):
                foreign.append(rel)

    walk("")
    return foreign


def remove_owned(folder: str | os.PathLike, allowed: tuple[str, ...], what: str = "") -> bool:
    """Delete ``folder`` when everything in it matches ``allowed`` (:func:`foreign_entries`):
    what sbpet writes there. Returns False when there is no such folder. Raises ValueError naming
    the first foreign file otherwise (nothing is deleted), and when ``folder`` is a file.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> open(os.path.join(folder, "mine.json"), "w").close()
        >>> remove_owned(folder, ("*.json",))
        True
    """
    folder = os.fspath(folder)
    if not os.path.lexists(folder):
        return False
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise ValueError(f"{folder} is not a folder sbpet made{what}: sbpet deletes only what it wrote; "
                         "move it away or choose another folder")
    foreign = foreign_entries(folder, allowed)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ValueError(f"{folder} holds {os.path.join(folder, foreign[0])}{more}, which sbpet did not write{what}: "
                         "sbpet deletes only what it wrote; move it away or choose another folder")
    shutil.rmtree(folder)
    return True


class LockBusy(RuntimeError):
    """Another process holds the lock (``folder_lock(..., wait=False)``)."""


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, *, wait: bool = True, on_wait=None):
    """Hold ``<path>.lock`` (a ``filelock.FileLock``: released if the process dies) for the block.
    ``wait`` False: raise :class:`LockBusy` at once when another process holds it; True: call
    ``on_wait()`` once (e.g. to say so) and wait for it. The lock file stays (deleting it would
    race a process that is about to take it)."""
    from filelock import FileLock, Timeout

    lock_path = os.fspath(path) + LOCK_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise LockBusy(f"another process is writing {os.fspath(path)} (it holds {lock_path})") from None
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield lock_path
    finally:
        lock.release()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content: the whole file up to 64 MiB; above, its size, its first
    MiB (a safetensors header, a zip directory's start) and 64 chunks spread evenly through it, so
    a large model's key costs milliseconds and still changes when its weights do."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(2**20))
            for i in range(_SAMPLE_CHUNKS):
                f.seek((size - _CHUNK) * i // (_SAMPLE_CHUNKS - 1))
                h.update(f.read(_CHUNK))
    return h.hexdigest()


def digest(value, length: int = 16) -> str:
    """A short SHA-256 hex digest of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]
