"""Checkpoints you can trust: atomic, checksummed, the last K kept, loadable with weights_only=True.

Each `checkpoint-<step>.pt` has a `checkpoint-<step>.json` beside it with its size and sha256, written
after the checkpoint itself: a checkpoint without one was never finished. Loading verifies the
checksum; `latest_good` reports a damaged or unfinished checkpoint and falls back to the one before.
Other files in the folder (a `checkpoint-best.pt` of your own, say) are left alone.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message says which and what to do."""


class _HashingWriter:
    """A file wrapper that hashes and counts what torch.save writes through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.bytes = stream, hashlib.sha256(), 0

    def write(self, data):
        self.digest.update(data)
        self.bytes += len(data)
        return self.stream.write(data)

    def flush(self):
        self.stream.flush()


def _write_failed(path, partial, error):
    partial.unlink(missing_ok=True)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return CheckpointError(f"cannot write {path}: the disk is full ({free / 2**30:.2f} GiB free in "
                               f"{path.parent}). Free space there or set run.out_dir elsewhere; earlier checkpoints "
                               f"are intact and run.resume=auto continues from the latest.")
    return CheckpointError(f"cannot write {path}: {error.strerror or error}")


def sidecar(path):
    return Path(path).with_suffix(".json")


def save_atomic(payload, path):
    """torch.save to a '.partial' file, renamed when complete, then the checksum sidecar. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as stream:
            writer = _HashingWriter(stream)
            torch.save(payload, writer)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
        record = json.dumps({"bytes": writer.bytes, "sha256": writer.digest.hexdigest()})
        sidecar_partial = sidecar(path).with_name(sidecar(path).name + ".partial")
        sidecar_partial.write_text(record)
        os.replace(sidecar_partial, sidecar(path))
    except OSError as error:
        raise _write_failed(path, partial, error) from None
    return path


def checkpoints(run_dir):
    """[(step, path)] of run_dir/checkpoints/checkpoint-<step>.pt, newest first; other files are ignored."""
    folder = Path(run_dir, "checkpoints")
    found = [(int(match[1]), path) for path in folder.glob("checkpoint-*.pt")
             if (match := CHECKPOINT_NAME.match(path.name))] if folder.is_dir() else []
    return sorted(found, reverse=True)


def latest_checkpoint(run_dir):
    """The checkpoint with the highest step (trusted or not), or None."""
    found = checkpoints(run_dir)
    return found[0][1] if found else None


def verify(path):
    """Raise CheckpointError unless `path` has its sidecar and matches its size and sha256."""
    path = Path(path)
    if not sidecar(path).is_file():
        raise CheckpointError(f"{path} has no {sidecar(path).name}: it was never finished")
    record = json.loads(sidecar(path).read_text())
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    if path.stat().st_size != record["bytes"] or digest.hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path} is damaged: its size or sha256 differs from {sidecar(path).name}")


def load(path):
    """A verified checkpoint's contents."""
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: cannot read this checkpoint ({error})") from None


def latest_good(run_dir, report=print):
    """(path, contents) of the newest checkpoint that verifies and loads, or (None, None); each one skipped
    on the way is reported with why."""
    for _, path in checkpoints(run_dir):
        try:
            return path, load(path)
        except CheckpointError as error:
            report(f"warning: {error}; trying the checkpoint before it")
    return None, None


def keep_latest(run_dir, keep):
    """Delete all but the newest `keep` checkpoints (and their sidecars)."""
    for _, path in checkpoints(run_dir)[keep:]:
        path.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
