"""An exclusive lock on a folder, held for as long as a job runs: a second job on the same folder stops at once.

The lock is `flock` on `<folder>/.lock`; the kernel releases it when the process ends, however it ends,
so a killed job never leaves a stale lock. The file says who holds it.
"""

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    pass


class FolderLock:
    def __init__(self, folder, job, fix):
        """Lock `folder` for `job` (e.g. "a trainer"); `fix` says what to do if another job holds it."""
        self.path = Path(folder) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise FolderBusy(f"{folder} is in use by {job} ({holder}); {fix}") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{job}: pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.handle.flush()

    def release(self):
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
