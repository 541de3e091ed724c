"""OutputLock: one run at a time writes into an output folder; and `run.json`: whose history the folder holds.

    with OutputLock("runs/exp1"):      # raises OutputLockError while another live run holds it
        trainer.train()

The lock is `<folder>/paperloop.lock`, a small JSON file naming its holder (pid, host, start time),
held with `fcntl.flock` for as long as the run writes, and removed when the run ends: on a normal
return, an exception, a SIGTERM the trainer turned into a stop, or at interpreter exit (atexit).

Why flock rather than creating the file with O_EXCL and judging staleness by its pid:
- the kernel (or, on NFS, the server's lock manager) drops a flock when its holder dies, SIGKILL
  included, so a lock is never stale by mistake: no pid can be reused, no clock compared;
- a pid means nothing across hosts or pid namespaces (containers, where every restart may be pid 1),
  so an O_EXCL lock left by a preempted job would block its own requeue on another node;
- Linux maps flock on NFS to whole-file POSIX locks, which NFSv3 (lockd) and NFSv4 share between
  hosts. On a mount without shared locks (`nolock`, `local_lock=flock`) two hosts could both get it;
  the file's contents then tell the second one who wrote there last, and it logs a warning.
A lock file left behind by a holder that died (its flock is gone, its contents are not) is taken
over, with a warning naming the dead holder. A filesystem that refuses flock altogether falls back
to the contents: a holder on this host whose pid is alive is refused, anything else taken over.

A folder holds one run's history (its checkpoints, logs, TensorBoard events): `<folder>/run.json` names the run
that writes it (`claim_folder`, when a fit starts), so the next fit can tell whether what it finds there is its own
(`folder_owner`); the trainer refuses a new run into a folder holding another run's history.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "paperloop.lock"
RUN_FILE = "run.json"  # {"run_id": the run whose history the folder holds}


class OutputLockError(RuntimeError):
    """Another live run writes into this output folder; names the folder, its pid and host."""


def pid_alive(pid: int) -> bool:
    """Is `pid` a running process on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLock:
    """An exclusive lock on `folder` for the duration of a run; a no-op when `enabled` is False
    (every process but the main one in DDP)."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._lock_file()
        except OSError as e:  # a file there, a read-only folder, /proc: say so, not a traceback from mkdir
            raise ConfigError(f"output_dir: {self.folder} cannot hold the run's files ({e.strerror or e}); choose "
                              "a folder you can write to") from None
        previous = _holder(fd)
        if previous:
            log.warning("%s: taking over the lock left by %s, %s", self.path, describe(previous), _why_stale(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)

    def _lock_file(self) -> int:
        """An open descriptor of the lock file, flocked by us."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputLockError(self._refusal(holder)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                return self._without_flock(fd, e)
            # The holder may have removed the file between our open and our flock: then we hold a
            # lock on a deleted file, and must start over on the one now at the path.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _without_flock(self, fd: int, error: OSError) -> int:
        log.warning("%s: this filesystem gives no locks (%s); only a run on this host is detected", self.path, error)
        holder = _holder(fd)
        if holder and holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid() \
                and isinstance(holder.get("pid"), int) and pid_alive(holder["pid"]):
            os.close(fd)
            raise OutputLockError(self._refusal(holder))
        return fd

    def _refusal(self, holder: dict | None) -> str:
        return (f"{self.folder}: another run is writing into this output folder ({describe(holder)}); "
                f"wait for it to end or choose another output_dir (the lock is {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Removed while still locked, so a run waiting on this very file cannot take it after us
            # (it checks that the file it locked is still the one at the path).
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # drops the flock
            atexit.unregister(self.release)


def _holder(fd: int) -> dict | None:
    """The holder a lock file names, or None when it is empty or unreadable."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown: the lock file is empty"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _why_stale(holder: dict) -> str:
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if isinstance(pid, int) and not pid_alive(pid):
            return "which is no longer running (it was killed or crashed before releasing it)"
        return "which no longer holds it"
    return ("which no longer holds it (killed, or its host went down); if that run is still going, this "
            "filesystem does not share locks between hosts: stop one of the two")


def folder_owner(folder: str | Path) -> str | None:
    """The id of the run whose history `folder` holds, as its run.json records it; None when there is none (a new
    folder, or one written before run.json was), or it is not one."""
    try:
        owner = json.loads((Path(folder) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def claim_folder(folder: str | Path, run_id: str) -> None:
    """Record that run `run_id` writes its history into `folder` (atomically: a temporary file renamed over)."""
    path = Path(folder) / RUN_FILE
    if folder_owner(folder) == run_id:
        return
    tmp = path.with_name(f".{RUN_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
    os.replace(tmp, path)
