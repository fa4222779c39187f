"""A checkpoint whose checksum matches but which does not unpickle (other bytes, a hostile pickle) is reported in
one line and the one before it is used; none readable stops in one line; a hostile pickle never runs."""

import hashlib
import json
import os
import random

import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError


class Hostile:
    """Pickles as a call to os.mkdir: unpickling it without weights_only would make the folder."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)


def write_with_matching_sidecar(path, data):
    """`data` as checkpoint `path`, with the sidecar its bytes give: the checksum cannot tell it is wrong."""
    path.write_bytes(data)
    checkpoint.sidecar(path).write_text(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def random_bytes(seed):
    """4 KiB of random bytes, the same each run; over seeds, the unpickler fails on them in several ways."""
    return random.Random(seed).randbytes(4096)


def unreadable_bytes(kind, tmp_path):
    if kind.startswith("random bytes"):
        return random_bytes(int(kind.split()[-1]))
    hostile = tmp_path / "hostile.pt"
    torch.save({"step": 2, "payload": Hostile(tmp_path / "the pickle ran")}, hostile)
    return hostile.read_bytes()


# Seeds whose bytes make the unpickler fail with UnpicklingError, IndexError, UnicodeDecodeError and KeyError:
# each is "not a checkpoint of this trainer".
RANDOM_BYTES = ["random bytes 0", "random bytes 2", "random bytes 195", "random bytes 20"]


@pytest.mark.parametrize("kind", [*RANDOM_BYTES, "hostile pickle"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, kind):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_atomic({"step": step}, folder / f"checkpoint-{step:08d}.pt")
    write_with_matching_sidecar(folder / "checkpoint-00000002.pt", unreadable_bytes(kind, tmp_path))
    reports = []
    path, state = checkpoint.latest_good(tmp_path, report=reports.append)
    assert state == {"step": 1} and path.name == "checkpoint-00000001.pt"
    assert len(reports) == 1 and "\n" not in reports[0] and "weights_only" not in reports[0]
    assert reports[0].startswith(f"warning: {folder}/checkpoint-00000002.pt is not a checkpoint of this trainer")
    assert not (tmp_path / "the pickle ran").exists()


@pytest.mark.parametrize("kind", [*RANDOM_BYTES, "hostile pickle"])
def test_no_readable_checkpoint_stops_in_one_line(tmp_path, kind):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    write_with_matching_sidecar(folder / "checkpoint-00000002.pt", unreadable_bytes(kind, tmp_path))
    with pytest.raises(CheckpointError) as raised:
        checkpoint.latest_good(tmp_path, report=lambda _: None)
    message = str(raised.value)
    assert message.startswith(f"none of the 1 checkpoints in {folder} can be loaded")
    assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "the pickle ran").exists()


def test_resuming_from_an_unreadable_checkpoint_path_is_one_line(demo_shards, tmp_path, capsys):
    """run.resume=<path> of a checkpoint that does not unpickle: exit 1 and one line, not torch's traceback."""
    from test_train import HARMONY_DEMO, TINY_MODEL

    from train.pretrain import main

    named = tmp_path / "elsewhere" / "checkpoint-00000002.pt"
    named.parent.mkdir()
    write_with_matching_sidecar(named, random_bytes(2))  # IndexError in the unpickler
    with pytest.raises(SystemExit) as exited:
        main(["--config", HARMONY_DEMO, *TINY_MODEL, f"data.shards={demo_shards['train']}", f"run.out_dir={tmp_path}",
              "run.name=run", f"run.resume={named}"])
    assert exited.value.code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"rank 0: stopped by CheckpointError: {named} is not a checkpoint of this trainer: it does not "
                      f"unpickle as tensors and plain values (a foreign or unsafe pickle, or other bytes), so it is "
                      f"not loaded"]
