"""Old runs resume (issue 33): a run folder written by an earlier trainer continues, exactly, under today's code.

tests/data/runs/harmony_demo_tiny/ is a run folder as the trainer left it after 2 steps of a tiny Harmony run
(the demo preset: iBOT, CLIP with soft targets, MAE, MLM, text distillation), written before issue 33 changed
the config's keys; its README.md names the commit that wrote it. It holds the checkpoint of step 2, config.yaml,
metrics.jsonl and status.json (the TensorBoard files, plots and teacher_weights.pt, which a resume does not read,
are left out), and reference_metrics.jsonl: the loss terms of an uninterrupted run of the same config to step 4.
It was written, on that commit only (today's keys are in the command), by

    .venv/bin/python tests/test_old_runs_resume.py tests/data/runs/harmony_demo_tiny

The test resumes a copy of it from its own config.yaml, as a user would (`python -m train.pretrain --config
<run>/config.yaml`), with only where it lives and where the shards are changed. It fails if a change to the
config stops today's code from reading that run: a key renamed or moved without a rename table applied to
the old config.yaml and to the config saved in the checkpoint, a module renamed without its state-dict keys
mapped, or a new setting whose default does not do what the old code did (the resumed losses then differ).
Never regenerate the fixture to make it pass: it stands for the runs users already have. A deliberate change of
the training's math (a loss's formula) changes the resumed losses too: then re-record the steps after 2 in
reference_metrics.jsonl from a resume of this fixture, name that commit in its README.md, and leave the
checkpoint and config.yaml as they are.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_training_shards

FIXTURE = Path(__file__).parent / "data" / "runs" / "harmony_demo_tiny"
CHECKPOINT_STEP, LAST_STEP = 2, 4
SAMPLES_PER_SHARD = 16


def fixture_shards(folder):
    """The training shards the fixture was trained on: 64 seeded noise images of 32 x 32 pixels in 4 shards."""
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
    return write_training_shards(folder, images, SAMPLES_PER_SHARD)


def shard_digests(folder):
    """{file name: sha256} of the shard folder's files (tars, DALI indexes, manifest)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(Path(folder).iterdir())}


def logged_rows(run_dir):
    return [json.loads(row) for row in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_written_before_the_config_refactor_resumes_exactly(tmp_path, capsys):
    from train.pretrain import main

    shards = fixture_shards(tmp_path / "shards")
    assert shard_digests(shards) == json.loads((FIXTURE / "shards_sha256.json").read_text()), \
        "the regenerated shards differ from the fixture's (Pillow's JPEG encoder changed?): the losses cannot match"
    run = tmp_path / "runs" / FIXTURE.name
    shutil.copytree(FIXTURE, run)
    main(["--config", str(run / "config.yaml"), f"data.shards={shards}", f"run.out_dir={run.parent}",
          f"run.name={run.name}", f"run.max_steps={LAST_STEP}", "run.resume=auto"])
    checkpoint_path = run / "checkpoints" / f"checkpoint-{CHECKPOINT_STEP:08d}.pt"
    assert f"resumed from {checkpoint_path} at step {CHECKPOINT_STEP}" in capsys.readouterr().out
    rows = logged_rows(run)
    reference = [json.loads(row) for row in (FIXTURE / "reference_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [row["step"] for row in reference] == list(range(1, LAST_STEP + 1))
    # CPU float sums may run in another order on another machine: equal to a relative 1e-5.
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference], rel=1e-5, abs=0)


# --- writing the fixture (on the commit its README names only) ------------------------------------------

TINY_HARMONY = ["model.vit_size=micro", "model.patch_size=8", "model.global_crop_px=32", "model.drop_path_rate=0.1",
                "model.clip_dim=16", "model.text_width=4", "model.text_layers=1", "model.text_heads=2",
                "model.ibot_out_dim=16", "model.ibot_head_hidden_dim=16", "model.text_distillation_out_dim=16",
                "model.text_distillation_head_hidden_dim=16", "model.head_bottleneck_dim=8",
                "model.mae_decoder_width=16", "model.mae_decoder_depth=1", "model.mae_decoder_heads=2",
                "model.mlm_decoder_depth=1", "model.mlm_decoder_heads=2", "data.global_crop_px=32",
                "data.local_crop_px=16", "data.local_crops_number=2", "data.batch_size=8", "data.num_workers=0",
                "data.backend=torch", "optim.warmup_epochs=0", "optim.lr=0.05", "optim.freeze_last_layer_epochs=0",
                "run.precision=fp32", "run.log_every=1", f"run.checkpoint_every={CHECKPOINT_STEP}",
                "run.keep_checkpoints=1"]
# The text width is 4 because the vocabulary's embedding and the MLM decoder's output layer (49,409 rows each, with
# AdamW's two moments) make most of the checkpoint; the micro ViT, the smallest, makes the rest. No warm-up and a
# high learning rate: each step moves the weights enough that a resume that lost the optimizer's state shows.
NOT_READ_BY_A_RESUME = ("tensorboard", "plots", "teacher_weights.pt", "teacher_weights.json", ".lock")
README = """\
# harmony_demo_tiny: a run folder written before issue 33's config refactor

Written by the trainer of commit {commit}
(train/, model/ and datapipe/load/ as committed: {clean}), torch {torch}, Pillow {pillow}, with

    .venv/bin/python tests/test_old_runs_resume.py tests/data/runs/harmony_demo_tiny

It trains the demo preset with the TINY_HARMONY overrides of tests/test_old_runs_resume.py on the shards of its
`fixture_shards` (their digests in shards_sha256.json):

- here, {checkpoint_step} steps: the checkpoint of step {checkpoint_step}, config.yaml, metrics.jsonl and status.json
  ({left_out}: left out, a resume does not read them);
- reference_metrics.jsonl: the loss terms of an uninterrupted run of the same config to step {last_step}.

The absolute paths in config.yaml, the checkpoint and status.json are those of a temporary folder; the test resumes
with data.shards and run.out_dir pointing at its own. Do not regenerate it after issue 33 changes the config's keys:
it stands for the runs users already have.
"""


def git(*arguments):
    repository = Path(__file__).parents[1]
    return subprocess.run(["git", "-C", str(repository), *arguments], capture_output=True, text=True,
                          check=True).stdout.strip()


def write_fixture(out_dir, scratch):
    """Train the fixture's run to CHECKPOINT_STEP in `out_dir` and an uninterrupted one to LAST_STEP in `scratch`."""
    import PIL
    import torch

    from train.log import loss_terms
    from train.pretrain import main

    out_dir, scratch = Path(out_dir), Path(scratch)
    shards = fixture_shards(scratch / "shards")
    again = fixture_shards(scratch / "shards_again")
    if shard_digests(shards) != shard_digests(again):
        raise SystemExit("two writes of the fixture's shards differ: they cannot be made again in the test")
    common = ["--config", "demo", *TINY_HARMONY, f"data.shards={shards}", f"run.out_dir={scratch}",
              f"run.name={out_dir.name}"]
    main([*common, f"run.max_steps={CHECKPOINT_STEP}"])
    written = scratch / out_dir.name
    for name in NOT_READ_BY_A_RESUME:
        path = written / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    uninterrupted = scratch / "uninterrupted"
    main([*common[:-1], f"run.name={uninterrupted.name}", f"run.max_steps={LAST_STEP}"])
    rows = logged_rows(uninterrupted)
    terms = loss_terms(rows)  # a term appears from the first step that logs it (clip_soft: from step 2)
    reference = [{"step": row["step"], **{name: row[name] for name in terms if name in row}} for row in rows]
    (written / "reference_metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in reference))
    (written / "shards_sha256.json").write_text(json.dumps(shard_digests(shards), indent=2) + "\n")
    changed = git("status", "--porcelain", "--", "train", "model", "datapipe/load")
    (written / "README.md").write_text(README.format(
        commit=git("rev-parse", "HEAD"), clean="yes" if not changed else f"no: {' '.join(changed.split())}",
        torch=torch.__version__, pillow=PIL.__version__, checkpoint_step=CHECKPOINT_STEP, last_step=LAST_STEP,
        left_out=", ".join(NOT_READ_BY_A_RESUME)))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(written, out_dir)


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/test_old_runs_resume.py tests/data/runs/harmony_demo_tiny")
    with tempfile.TemporaryDirectory() as scratch_dir:
        write_fixture(sys.argv[1], scratch_dir)
