"""Crash-safe output files: atomic writes (and the partial files a kill leaves behind), output folders checked before
any work and locked against a second process."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def make_output_folder(folder: str, arg: str) -> None:
    """Create ``folder`` (and its parents), named by the command-line argument ``arg`` (e.g. "--out"), before
    any work a bad folder would lose: ValueError naming ``arg`` and the folder if it cannot be created or is not
    writable."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{arg}: cannot create the folder {folder!r} ({e})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{arg}: the folder {folder!r} is not writable")


@contextlib.contextmanager
def folder_lock(folder: str, arg: str):
    """Hold an exclusive lock on ``folder`` (``flock`` of ``folder/.lock``, released when the process ends, however
    it ends) for the ``with`` block; ValueError naming the argument ``arg`` if another process holds it.  Where
    ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(folder, ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{arg}: {folder!r} is in use by another process (it holds {folder}/.lock); wait for "
                             "it to finish or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str, write) -> None:
    """Call ``write(binary file)`` on a temporary file in ``path``'s folder, fsync, then rename it over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str, obj) -> None:
    """``obj`` as indented JSON with ``atomic_write``."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def remove_partial_files(folder: str) -> list[str]:
    """Delete the temporary files ``atomic_write`` leaves in ``folder`` when a kill interrupts it (``.tmp-*``:
    never a finished file, which is renamed over its real name); returns their paths."""
    if not os.path.isdir(folder):
        return []
    partial = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".tmp-"))
    for path in partial:
        os.unlink(path)
    return partial
