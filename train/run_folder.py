"""One trainer per run folder, and what the run folder says about how the run ended.

`lock_run` holds an exclusive lock on `<run>/.lock` for as long as the trainer lives (the kernel
releases it when the process dies, however it dies), so a second trainer started on the same folder
stops at once with a message instead of interleaving metrics and overwriting checkpoints.
`write_status` keeps `<run>/status.json` up to date: running, finished, preempted (resumable) or failed.
"""

import json
from pathlib import Path

from datapipe.folder_lock import FolderLock
from datapipe.manifest import write_atomic
from train.checkpoint import CheckpointError

STATUS_FILE = "status.json"


def lock_run(run_dir):
    """The run folder's lock; FolderBusy if another trainer holds it."""
    return FolderLock(run_dir, "another trainer", "wait for it to end, stop it, or give this run another run.name")


def write_status(run_dir, state, step, **details):
    """<run>/status.json, written atomically: {"state": ..., "step": ..., **details}."""
    path = Path(run_dir) / STATUS_FILE
    try:
        write_atomic(path, json.dumps({"state": state, "step": step, **details}, indent=2))
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None


def read_status(run_dir):
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
