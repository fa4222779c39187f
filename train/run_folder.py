"""One trainer per run folder, and what the run folder says about how the run ended.

`RunLock` holds an exclusive lock on `<run>/.lock` for as long as the trainer lives (the kernel
releases it when the process dies, however it dies), so a second trainer started on the same folder
stops at once with a message instead of interleaving metrics and overwriting checkpoints.
`write_status` keeps `<run>/status.json` up to date: running, finished, preempted (resumable) or failed.
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from train.checkpoint import CheckpointError

LOCK_FILE = ".lock"
STATUS_FILE = "status.json"


class RunFolderBusy(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunFolderBusy(f"{run_dir} is in use by another trainer ({holder}); wait for it to end, stop it, or "
                                f"give this run another run.name") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.handle.flush()

    def release(self):
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def write_status(run_dir, state, step, **details):
    """<run>/status.json, written atomically: {"state": ..., "step": ..., **details}."""
    path = Path(run_dir) / STATUS_FILE
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps({"state": state, "step": step, **details}, indent=2))
        os.replace(partial, path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None


def read_status(run_dir):
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
