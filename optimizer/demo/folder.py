"""The run folder (``--out``): held by one run at a time, and checked for writing before any work.

Note [one run per folder]
~~~~~~~~~~~~~~~~~~~~~~~~~
Two runs in one folder write the same checkpoints: each replaces the other's, and a check
that the folder is empty, made by both before either writes, lets both in. So a run holds its
folder from before it reads or checks anything there until it exits: an exclusive OS lock
(``fcntl.flock``, not waited for) on the file ``.demo.lock`` in it, which says who holds it
(pid and host). A second run finds the lock taken and stops with one line naming that run,
having written nothing. The kernel drops the lock when the holder's process ends, however it
ends (kill -9 too): a file left behind blocks nothing, the next run takes the lock and
rewrites it. A holder that ends normally removes the file; a run that opened it just before
then holds a lock on a removed file, so a lock counts only once the file it locked is still
the one in the folder (else it opens it again). Under torchrun only rank 0, the one that
writes, holds the folder. The lock is as good as the file system's flock (local disks; NFS
emulates it with its own locks); where there is no ``fcntl`` (Windows) a folder is not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import tempfile
import time
from collections.abc import Iterator

from ..factory import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock (Note [one run per folder])
    fcntl = None

LOCK_NAME = ".demo.lock"  # never one of the run's files: the folder's checks and --overwrite leave it be


@contextlib.contextmanager
def hold(out: pathlib.Path, flag: str = "--out") -> Iterator[None]:
    """Hold the run folder ``out`` (created if missing) for the ``with`` block: one line naming
    ``flag`` (a ``ConfigError``) if it is a file, cannot be created or written, or another run holds
    it. Folders created for it are removed again if they are empty when the block ends (a run
    refused after this leaves nothing behind)."""
    created = _make(out, flag)
    fd = None
    try:
        fd = _lock(out, flag)
        _check_writable(out, flag)
        yield
    finally:
        if fd is not None:
            _release(out, fd)
        for folder in created:  # deepest first; stops at the first that holds something
            try:
                folder.rmdir()
            except OSError:
                break


def _make(out: pathlib.Path, flag: str) -> list[pathlib.Path]:
    """Create ``out`` if needed; the folders created, deepest first."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Invalid {flag}: {str(out)!r} is a file, not a folder")
    missing, folder = [], out.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Invalid {flag}: cannot create {str(out)!r} ({err.strerror}); choose a folder you can "
                          "write to") from None
    return missing


def _cannot_write(out: pathlib.Path, flag: str, err: OSError) -> ConfigError:
    return ConfigError(f"Invalid {flag}: cannot write in {str(out)!r} ({err.strerror}); choose a folder you can "
                       "write to")


def _lock(out: pathlib.Path, flag: str) -> int | None:
    """The descriptor of the locked ``.demo.lock``, which now names this process."""
    path = out / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _cannot_write(out, flag, err) from None
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"Invalid {flag}: {str(out)!r} is in use by another run ({holder}); wait for it to "
                              f"end, or choose another {flag}") from None
        except OSError as err:
            os.close(fd)
            raise ConfigError(f"Invalid {flag}: cannot lock {str(path)!r} ({err.strerror}); choose a folder on a "
                              "local disk") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder ended and removed it after we opened it: open the folder's file again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    except OSError as err:
        _release(out, fd)
        raise _cannot_write(out, flag, err) from None
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, from its file (written just after the lock is taken: wait a moment for it)."""
    for _ in range(20):
        try:
            who = json.loads(os.pread(fd, 4096, 0))
            return f"pid {who['pid']} on {who['host']}"
        except (ValueError, KeyError, TypeError, OSError):
            time.sleep(0.05)
    return "its pid and host unknown"


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _release(out: pathlib.Path, fd: int) -> None:
    """Remove the lock's file (if it is still ours), then let the lock go."""
    with contextlib.suppress(OSError):
        if _same_file(fd, out / LOCK_NAME):
            os.unlink(out / LOCK_NAME)
    os.close(fd)


def _check_writable(out: pathlib.Path, flag: str) -> None:
    """A file can be created and removed in ``out``, as each checkpoint is (the lock's file may be
    one left by an earlier run, opened without creating it)."""
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=LOCK_NAME + ".")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _cannot_write(out, flag, err) from None
