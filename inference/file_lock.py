"""A lock shared by the processes on one volume, whose file goes away when it is released.

filelock's FileLock keeps its file for good: removing a lock file while another process waits on
it would hand "the same" lock to two processes (the waiter ends up holding the removed file, a
newcomer a new one). Here the holder removes the file just before it lets go, and whoever gets a
lock checks that the file it locked is still the one at the path; if not, it tries again on the
file there now. So a lock folder holds only the locks in use, and those of killed processes (free:
taking and releasing one removes it). `flock(2)`, as filelock uses on Unix, so the two interoperate.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

POLL_S = 0.05


class RemovableFileLock:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting up to `timeout` seconds (0: one try); False if it stayed taken.
        FileNotFoundError when the lock's folder is gone."""
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_S)
                continue
            if _same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)  # removed (or replaced) while we waited: lock the file there now

    def release(self) -> None:
        """Remove the file, then let go: in that order, so nobody can take a file that is about to go."""
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)
