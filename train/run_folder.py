"""One trainer per run folder, and what the run folder says about how the run ended.

`lock_run` holds an exclusive lock on `<run>/.lock` for as long as the trainer lives (the kernel
releases it when the process dies, however it dies), so a second trainer started on the same folder
stops at once with a message instead of interleaving metrics and overwriting checkpoints.
`write_status` keeps `<run>/status.json` up to date: running, finished, preempted (resumable) or failed;
`nonfinite_stop_reason` says when skipped non-finite steps make a run failed rather than finished.
"""

import json
from pathlib import Path

from datapipe.common.folder_lock import FolderLock
from datapipe.common.manifest import write_atomic
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


def nonfinite_stop_reason(in_a_row, steps_run, max_in_a_row, step, run_dir, last_step):
    """Why the run must stop as failed after `step`, or None: `max_in_a_row` skipped (non-finite) steps in a row,
    or, at its `last_step`, every one of the `steps_run` steps this session ran skipped, however few (`in_a_row`
    counts the skipped steps since the last applied one)."""
    if in_a_row >= max_in_a_row:
        return (f"{in_a_row} steps in a row had a non-finite loss (last: step {step}); stopped. The last good "
                f"checkpoint is intact in {run_dir}/checkpoints. Lower optim.lr, or try run.precision=bf16 or fp32.")
    if step >= last_step and in_a_row and in_a_row == steps_run:
        return (f"no step of this run had a finite loss (all {steps_run} up to step {step} were skipped): it trained "
                f"nothing, so it is marked failed. Lower optim.lr, or try run.precision=bf16 or fp32.")
    return None


def read_status(run_dir):
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
