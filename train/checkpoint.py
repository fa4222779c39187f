"""Checkpoints: atomic, complete for exact resume, loadable with weights_only=True."""

import os
from pathlib import Path

import torch

CHECKPOINT_PATTERN = "checkpoint-*.pt"


def save_atomic(payload, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def latest_checkpoint(run_dir):
    """The checkpoint with the highest step in run_dir/checkpoints, or None."""
    candidates = sorted(Path(run_dir, "checkpoints").glob(CHECKPOINT_PATTERN),
                        key=lambda path: int(path.stem.split("-")[1]))
    return candidates[-1] if candidates else None


def load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:
        raise RuntimeError(f"{path}: cannot read this checkpoint ({error}); resume from another one "
                           f"or start afresh with run.resume=none") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
