"""Checkpoints you can trust: atomic, checksummed, the last K kept, loadable with weights_only=True.

Each `checkpoint-<step>.pt` has a `checkpoint-<step>.json` beside it with its size and sha256, written
after the checkpoint itself: a checkpoint without one was never finished. Loading verifies the
checksum and unpickles tensors and plain values only (weights_only=True: a hostile pickle never runs);
`latest_good` reports a damaged, unfinished or unreadable checkpoint and falls back to the one before.
Other files in the folder (a `checkpoint-best.pt` of your own, say) are left alone.
"""

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message says which and what to do."""


class UnverifiedCheckpoint(CheckpointError):
    """A checkpoint whose sidecar is missing or unreadable: neither known good nor known damaged."""


class _HashingWriter:
    """A file wrapper that hashes and counts what torch.save writes through it, and keeps the OSError a write
    raised: torch reports it as a RuntimeError ("unexpected pos") that no longer says the disk is full."""

    def __init__(self, stream):
        self.stream, self.digest, self.bytes, self.error = stream, hashlib.sha256(), 0, None

    def write(self, data):
        self.digest.update(data)
        self.bytes += len(data)
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.stream.flush()


def size_text(size_bytes):
    return f"{size_bytes / 2**30:.2f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:.1f} MiB"


def payload_bytes(payload):
    """Bytes of the tensors in a nested dict/list/tuple (each storage once): about its checkpoint's size."""
    storages = {}
    pending = [payload]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _write_failed(path, error, needed_bytes):
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return CheckpointError(f"cannot write {path}: the disk is full ({size_text(free)} free in {path.parent}; "
                               f"this checkpoint needs about {size_text(needed_bytes)}). Free space there, or move "
                               f"the run folder to a disk with room and point run.out_dir there; earlier checkpoints "
                               f"are intact and run.resume=auto continues from the latest.")
    return CheckpointError(f"cannot write {path}: {error.strerror or error}")


def sidecar(path):
    return Path(path).with_suffix(".json")


def save_atomic(payload, path):
    """torch.save to a '.partial' file and the checksum sidecar to another, both renamed when complete (the
    checkpoint first). A failed write leaves no '.partial'. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    sidecar_partial = sidecar(path).with_name(sidecar(path).name + ".partial")
    writer = None
    try:
        with open(partial, "wb") as stream:
            writer = _HashingWriter(stream)
            torch.save(payload, writer)
            stream.flush()
            os.fsync(stream.fileno())
        sidecar_partial.write_text(json.dumps({"bytes": writer.bytes, "sha256": writer.digest.hexdigest()}))
        os.replace(partial, path)  # the checkpoint, then its sidecar: one without a sidecar was never finished
        os.replace(sidecar_partial, sidecar(path))
    except (OSError, RuntimeError) as error:
        partial.unlink(missing_ok=True)
        sidecar_partial.unlink(missing_ok=True)
        write_error = error if isinstance(error, OSError) else writer and writer.error
        if not write_error:
            raise
        raise _write_failed(path, write_error, payload_bytes(payload)) from None
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


def read_sidecar(path):
    """{"bytes": ..., "sha256": ...} from `path`'s sidecar; CheckpointError if it is missing or unreadable."""
    record_path = sidecar(path)
    if not record_path.is_file():
        raise UnverifiedCheckpoint(f"{path} has no {record_path.name}: it was never finished")
    try:
        record = json.loads(record_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str)):
        raise UnverifiedCheckpoint(f"{record_path} is damaged (not the JSON record of a size and sha256): "
                                   f"{path} cannot be verified")
    return record


def verify(path):
    """Raise CheckpointError unless `path` has its sidecar and matches its size and sha256."""
    path = Path(path)
    record = read_sidecar(path)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    if path.stat().st_size != record["bytes"] or digest.hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path} is damaged: its size or sha256 differs from {sidecar(path).name}")


def load(path, trust_unverified=False, report=print):
    """A verified checkpoint's contents. With trust_unverified, one whose sidecar is missing or unreadable is
    loaded unchecked (and reported); one that disagrees with its sidecar never is."""
    try:
        verify(path)
    except UnverifiedCheckpoint as error:
        if not trust_unverified:
            raise
        report(f"warning: {error}; loading it unchecked, as run.trust_unverified_checkpoint=true asks")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # What the unpickler raises on bytes that are not a pickle of tensors (torch's text for UnpicklingError suggests
    # weights_only=False, which would run what the file holds).
    except (pickle.UnpicklingError, IndexError, KeyError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a checkpoint of this trainer: it does not unpickle as tensors and "
                              f"plain values (a foreign or unsafe pickle, or other bytes), so it is not "
                              f"loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot read this checkpoint ({reason})") from None


def latest_good(run_dir, report=print):
    """(path, contents) of the newest checkpoint that verifies and loads, or (None, None) when there is none;
    each one skipped on the way is reported with why. CheckpointError if there are some and none loads: a fresh
    start would keep them as the newest and delete its own checkpoints."""
    found = checkpoints(run_dir)
    for _, path in found:
        try:
            return path, load(path)
        except CheckpointError as error:
            report(f"warning: {error}; trying the checkpoint before it")
    if found:
        folder = Path(run_dir, "checkpoints")
        raise CheckpointError(f"none of the {len(found)} checkpoints in {folder} can be loaded (each is reported "
                              f"above): put an intact one back, or move them out of that folder (or choose another "
                              f"run.name) to start afresh")
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
