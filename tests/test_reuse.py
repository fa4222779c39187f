"""The pipeline as a library: an open_clip model trains on our shards (our loader, and open_clip's own trainer);
the crop grid is drawn."""

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from doc_commands import doc_lines

from examples.train_open_clip import train
from tools.show_crops import show_crops


def test_open_clip_trains_on_our_shards_and_its_loss_falls(demo_shards):
    batch_size = 16
    losses = train(demo_shards["train"], steps=40, batch_size=batch_size, backend="dali")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.9 * math.log(batch_size) and last < first - 0.4, (first, last)


def test_show_crops_writes_a_png_grid(demo_shards, tmp_path):
    out = show_crops(demo_shards["train"], tmp_path / "crops.png", samples=2, backend="torch")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def documented_command(starts_with):
    """The first shell command of the README or a docs/ page that starts with `starts_with` (backslash continuations
    joined)."""
    lines = doc_lines()
    for number, line in enumerate(lines):
        if line.startswith(starts_with):
            command = line
            while command.endswith("\\"):
                number += 1
                command = command[:-1] + lines[number].strip()
            return shlex.split(command)
    raise AssertionError(f"neither README.md nor docs/ has a command starting with {starts_with!r}")


def with_option(command, name, value):
    position = command.index(name)
    return command[:position + 1] + [value] + command[position + 2:]


def test_open_clip_own_trainer_reads_our_shards_and_its_loss_falls(larger_demo_shards, tmp_path):
    """The documented `python -m open_clip_train.main` command (docs/reuse.md), pointed at the test shards."""
    command = documented_command(".venv/bin/python -m open_clip_train.main")
    names = [shard["name"] for shard in larger_demo_shards["manifest"]["shards"]]
    shard_range = f"{larger_demo_shards['train']}/{{{Path(names[0]).stem}..{Path(names[-1]).stem}}}.tar"
    command = with_option(command, "--train-data", shard_range)
    command = with_option(command, "--train-num-samples", str(larger_demo_shards["manifest"]["totals"]["samples"]))
    command = with_option(command, "--logs", str(tmp_path))
    command = with_option(command, "--log-every-n-steps", "1")
    done = subprocess.run([sys.executable, *command[1:]], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = next(tmp_path.glob("*/out.log")).read_text()
    losses = [float(value) for value in re.findall(r" Loss: ([0-9.]+) \(", log)]
    batch_size = int(command[command.index("--batch-size") + 1])
    assert len(losses) >= 40, log[-2000:]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.9 * math.log(batch_size) and last < first - 0.4, (first, last)
