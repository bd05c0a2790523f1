"""The start lock: who may start, and who serves, the model server of one socket path.

The lock is an exclusive ``flock`` on ``<socket>.lock``, a file in the socket's private
(0700) directory, so only the owner of that directory can take it; no other user can
compute a name and hold it first. Whoever holds it is the one server of the path, or the
one client starting it:

- a client that finds no server answering takes the lock, spawns the server and hands
  the lock over: the server inherits the locked file (``pass_fds``) and learns its
  descriptor from ``BEAMLET_START_LOCK_FD``. A lock belongs to an open file, not a
  process, so it is never free between the client and the server: a second client sees
  it held and waits for the server to answer instead of spawning another one;
- a server started by hand (``python -m modelserver serve``) takes it itself, and exits
  with code 3 when someone else holds it;
- the server holds it for its whole life. The kernel releases it when the last process
  holding the file exits, however it exits, so a crashed server never blocks the next.

The file exists only while someone holds it: a holder that gives the lock up removes the
file first, then unlocks. A process that opened the old file and locks it after that
finds the path gone or pointing at a new file, and starts again (``_lock_open``), so two
holders can never each believe they have it. A server killed with SIGKILL leaves the file
behind, unlocked: harmless, the next holder reuses it.

A process that forks (without exec) while it holds the lock gives its child a share of
it; a client holds it only for the moment it takes to spawn the server.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from modelserver import config

FD_ENV = "BEAMLET_START_LOCK_FD"
SUFFIX = ".lock"


def lock_path(socket_path: str) -> str:
    return socket_path + SUFFIX


class StartLock:
    """A held start lock (``try_acquire``, ``inherited``). Release it, or hand it over to
    a child process and forget it (``detach``)."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    @classmethod
    def try_acquire(cls, socket_path: str) -> StartLock | None:
        """The lock for ``socket_path`` if nobody holds it, else None. Creates the socket's
        directory 0700 if needed; raises PermissionError for a directory that is not ours
        and private, or a lock file that is not a regular file of ours."""
        config.ensure_private_dir(os.path.dirname(socket_path))
        path = lock_path(socket_path)
        while True:
            fd = _lock_open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                return cls(fd, path)
            os.close(fd)  # the holder removed it after we opened it: take the new one

    @classmethod
    def inherited(cls, socket_path: str) -> StartLock | None:
        """The lock a client handed to this process when it spawned it, if any (and only
        if it is the lock of ``socket_path``, still held)."""
        raw = os.environ.pop(FD_ENV, None)
        if not raw:
            return None
        try:
            fd = int(raw)
            os.set_inheritable(fd, False)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op that proves it
        except (ValueError, OSError):
            return None
        path = lock_path(socket_path)
        if not _same_file(fd, path):
            os.close(fd)
            return None
        return cls(fd, path)

    def child_env(self) -> dict[str, str]:
        """What a child spawned with ``pass_fds=(lock.fd,)`` needs to find the lock."""
        return {FD_ENV: str(self.fd)}

    def detach(self) -> None:
        """Forget the lock without releasing it: a child spawned with it holds it now (or,
        if the child died, the kernel released it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Remove the lock file, then unlock. Idempotent."""
        if self.fd < 0:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _lock_open(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"start lock {path} is a symbolic link; remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"start lock {path} is not a regular file of ours; remove it")
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
