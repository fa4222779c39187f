"""Training on clusters: preemption signals, elastic resume, no silent hang, checkpoints you can trust, one
trainer per run folder, resumes that say what changed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY_MODEL, tiny_config

from datapipe.common.folder_lock import FolderBusy
from train import checkpoint
from train.checkpoint import CheckpointError
from train.config import load_config
from train.distributed import free_loopback_port
from train.preemption import EXIT_PREEMPTED
from train.run_folder import lock_run, read_status

REPO = Path(__file__).parents[1]


def overrides(shards, run_dir, *extra):
    return [*TINY_MODEL, f"data.shards={shards}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
            "data.backend=dali", "data.num_workers=1", *extra]


TORCHRUN_ARGS = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120"]  # Makefile's


def torchrun(nproc, arguments):
    """torchrun as `make pretrain` runs it: through train.launch."""
    command = [sys.executable, "-m", "train.launch", "--standalone", f"--nproc_per_node={nproc}",
               *TORCHRUN_ARGS, "-m", "train.pretrain", "--config", "harmony/demo", *arguments]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(row)["step"] for row in path.read_text().splitlines()] if path.is_file() else []


def wait_for_steps(process, run_dir, steps, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while len(logged_steps(run_dir)) < steps:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {steps} steps after {timeout_s} s"
        time.sleep(0.2)


def test_signals_to_torchrun_checkpoint_the_step_and_each_resume_continues(demo_shards, tmp_path):
    """SIGTERM (preemption), then SIGUSR1 (slurm's --signal) to the resumed run: torchrun forwards each to both
    ranks, each stop checkpoints its step, and the next run continues from it."""
    run = tmp_path / "run"
    arguments = overrides(demo_shards["train"], run, "data.batch_size=4", "optim.epochs=100",
                          "run.checkpoint_every=1000")
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        process = torchrun(2, arguments)
        wait_for_steps(process, run, len(logged_steps(run)) + 3)
        signalled = time.monotonic()
        process.send_signal(stop_signal)
        output, errors = process.communicate(timeout=120)
        assert time.monotonic() - signalled < 30, errors[-3000:]
        assert process.returncode == 128 + stop_signal and "Traceback" not in errors, errors[-3000:]
        assert errors.rstrip().endswith(f"training stopped by {stop_signal.name}; the trainers' messages above say "
                                        "where it stands")
        status = read_status(run)
        assert status["state"] == "preempted" and stop_signal.name in status["reason"], status
        assert logged_steps(run) == list(range(1, status["step"] + 1))  # nothing after the checkpointed step
        assert checkpoint.load(checkpoint.latest_checkpoint(run))["step"] == status["step"]  # no step lost
        if stop_signal == signal.SIGUSR1:
            assert f"resumed from {checkpoint.latest_checkpoint(run).parent}" in output
    refused = torchrun(2, [*arguments, "optim.lr=0.5"])  # an error a rank finds once torchrun has started it
    _, errors = refused.communicate(timeout=300)
    assert refused.returncode == 1 and "Traceback" not in errors and "ChildFailedError" not in errors, errors[-3000:]
    assert "would not continue the run the checkpoint belongs to" in errors
    assert errors.rstrip().endswith("exited with code 1 (its message is above)")
    resumed = torchrun(2, [*arguments, f"run.max_steps={status['step'] + 2}"])
    output, errors = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, errors[-3000:]
    assert f"resumed from {checkpoint.latest_checkpoint(run).parent}" in output
    assert logged_steps(run) == list(range(1, status["step"] + 3)) and read_status(run)["state"] == "finished"


def test_sigusr1_stops_a_single_process_run_with_the_documented_exit_code(demo_shards, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--config", "harmony/demo",
                                *overrides(demo_shards["train"], run, "optim.epochs=100")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(process, run, 2)
    process.send_signal(signal.SIGUSR1)  # slurm's --signal
    output, errors = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, errors[-3000:]
    status = read_status(run)
    assert status["state"] == "preempted" and "SIGUSR1" in status["reason"]
    assert checkpoint.load(checkpoint.latest_checkpoint(run))["step"] == status["step"] == logged_steps(run)[-1]
    assert "Run the same command again to continue" in output


def launched(launcher, demo_shards, tmp_path, output):
    """(launcher process, run folder) of a long demo training started by torchrun or by make compare."""
    if launcher == "torchrun":
        run = tmp_path / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   *TORCHRUN_ARGS, "-m", "train.pretrain", "--config", "harmony/demo",
                   *overrides(demo_shards["train"], run, "optim.epochs=100", "run.checkpoint_every=1000")]
    else:
        run = tmp_path / "cmp" / "clip" / "seed0"
        command = [sys.executable, "-m", "comparison.run", "--name", "cmp", "--methods", "clip", "--budget",
                   "epochs:20", "--eval-points", "1", "--shards", str(demo_shards["train"]), "--out", str(tmp_path),
                   "--zeroshot", str(demo_shards["heldout"]), "--train-args", "data.batch_size=8",
                   "data.num_workers=0", "run.checkpoint_every=1000"]
    return subprocess.Popen(command, cwd=REPO, stdout=output, stderr=output), run


@pytest.mark.parametrize("launcher", ["torchrun", "make compare"])
def test_killing_the_launcher_stops_its_trainer_after_a_checkpoint(demo_shards, tmp_path, launcher):
    """torchrun and make compare start trainers in sessions of their own; killed with SIGKILL they cannot stop
    them, so the trainers notice."""
    with open(tmp_path / "output.txt", "w") as output:  # not a pipe: nobody reads it once the launcher is gone
        process, run = launched(launcher, demo_shards, tmp_path, output)
        wait_for_steps(process, run, 2)
        trainer_pid = int(re.search(r"pid (\d+)", (run / ".lock").read_text())[1])
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{trainer_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not Path(f"/proc/{trainer_pid}").exists(), f"the trainer outlived {launcher}"
    status = read_status(run)
    assert status["state"] == "preempted" and f"{launcher}, which launched" in status["reason"], status
    assert checkpoint.load(checkpoint.latest_checkpoint(run))["step"] == status["step"]


def test_elastic_resume_two_ranks_to_one_and_back(demo_shards, tmp_path, capsys):
    """A job requeued on another number of ranks continues with the same global batch and sample sequence."""
    from train.pretrain import train

    run = tmp_path / "run"
    first = torchrun(2, overrides(demo_shards["train"], run, "data.batch_size=4", "run.max_steps=3"))
    _, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors[-3000:]
    train(load_config("harmony/demo", overrides(demo_shards["train"], run, "data.batch_size=4", "run.max_steps=6")))
    assert "data.batch_size 4 -> 8, keeping the checkpoint's global batch of 8" in capsys.readouterr().out
    state = checkpoint.load(checkpoint.latest_checkpoint(run))
    assert state["step"] == 6 and state["loader"]["batches_done"] == 6 and state["loader"]["world_size"] == 1
    back = torchrun(2, overrides(demo_shards["train"], run, "data.batch_size=8", "run.max_steps=9"))
    output, errors = back.communicate(timeout=300)
    assert back.returncode == 0, errors[-3000:]
    assert "data.batch_size 8 -> 4" in output
    state = checkpoint.load(checkpoint.latest_checkpoint(run))
    assert state["loader"]["batches_done"] == 9 and state["loader"]["global_batch_size"] == 8
    assert logged_steps(run) == list(range(1, 10))


RANK_SCRIPT = """
import sys
from train import pretrain

failing_rank, failing_step = int(sys.argv[1]), int(sys.argv[2])
original = pretrain.Trainer.train_step

def train_step(self, *arguments, **keywords):
    if self.world.rank == failing_rank and self.step == failing_step:
        raise RuntimeError(f"injected failure on rank {failing_rank}")
    return original(self, *arguments, **keywords)

pretrain.Trainer.train_step = train_step
pretrain.main(sys.argv[3:])
"""


def two_ranks(tmp_path, arguments, failing_rank=-1, failing_step=-1):
    """Two gloo ranks started by hand (no torchrun to clean up after them); returns [(exit code, stderr)]."""
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    port = free_loopback_port()
    processes = [subprocess.Popen(
        [sys.executable, str(script), str(failing_rank), str(failing_step), "--config", "harmony/demo", *arguments],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
             "RANK": str(rank), "LOCAL_RANK": str(rank), "PYTHONPATH": str(REPO)}) for rank in range(2)]
    return [(process.wait(timeout=240), process.stderr.read()) for process in processes]


def test_an_exception_on_one_rank_stops_every_rank_with_the_error(demo_shards, tmp_path):
    started = time.monotonic()
    results = two_ranks(tmp_path, overrides(demo_shards["train"], tmp_path / "run", "data.batch_size=4",
                                            "run.collective_timeout_s=60", "optim.epochs=100"),
                        failing_rank=1, failing_step=2)
    assert time.monotonic() - started < 120
    (code_0, errors_0), (code_1, errors_1) = results
    assert code_0 != 0 and code_1 != 0
    assert "rank 1: stopped by RuntimeError: injected failure on rank 1" in errors_1
    assert "rank 0: stopped by" in errors_0, errors_0[-2000:]
    assert read_status(tmp_path / "run")["state"] == "failed"


def test_a_checkpoint_write_that_fails_stops_every_rank_with_a_disk_full_message(demo_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-00000002.pt.partial").symlink_to("/dev/full")  # writes fail: ENOSPC
    started = time.monotonic()
    results = two_ranks(tmp_path, overrides(demo_shards["train"], run, "data.batch_size=4",
                                            "run.collective_timeout_s=60", "run.checkpoint_every=2",
                                            "optim.epochs=100"))
    assert time.monotonic() - started < 120
    (code_0, errors_0), (code_1, errors_1) = results
    assert code_0 != 0 and code_1 != 0
    assert "the disk is full" in errors_0 and "Traceback" not in errors_0, errors_0[-2000:]
    assert "rank 1: stopped by" in errors_1
    assert not list((run / "checkpoints").glob("*.partial"))


# --- checkpoints, the run folder, resumed configs (one process) ---------------------------------------

def train_tiny(shards, run, *extra):
    from train.pretrain import train

    return train(tiny_config(shards, run, *extra))


def test_damaged_checkpoints_are_reported_and_the_previous_one_is_used(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train_tiny(demo_shards["train"], run, "run.max_steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=3")
    steps = [step for step, _ in checkpoint.checkpoints(run)]
    assert steps == [6, 4, 2]
    (run / "checkpoints" / "checkpoint-best.pt").write_bytes(b"a file of the user's")  # ignored
    newest = checkpoint.latest_checkpoint(run)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    middle = run / "checkpoints" / "checkpoint-00000004.pt"
    middle.write_bytes(middle.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    train_tiny(demo_shards["train"], run, "run.max_steps=8", "run.checkpoint_every=2")
    output = capsys.readouterr().out
    assert "checkpoint-00000006.pt is damaged" in output and "checkpoint-00000004.pt is damaged" in output
    assert "resumed from" in output and "checkpoint-00000002.pt at step 2" in output
    assert [step for step, _ in checkpoint.checkpoints(run)] == [8, 6, 4]  # the newest 3 kept
    assert (run / "checkpoints" / "checkpoint-best.pt").is_file()


def test_disk_full_while_checkpointing_is_a_clear_error(demo_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-00000002.pt.partial").symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match="the disk is full .* earlier checkpoints are intact"):
        train_tiny(demo_shards["train"], run, "run.max_steps=2")
    assert not list((run / "checkpoints").iterdir())


def test_a_checkpoint_larger_than_the_free_space_says_what_it_needs_and_leaves_nothing(small_file_system):
    """torch.save reports the ENOSPC of its writes as a RuntimeError ("unexpected pos"); it is still a full disk."""
    path = small_file_system / "checkpoints" / "checkpoint-00000001.pt"
    with pytest.raises(CheckpointError, match=r"the disk is full \([\d.]+ MiB free in .*; this checkpoint needs "
                                              r"about 3\.8 MiB\)\. Free space there"):
        checkpoint.save_atomic({"weights": torch.zeros(1_000_000)}, path)  # 4 MB
    assert not list(path.parent.iterdir())


@pytest.mark.parametrize("record", [b"{\"bytes\": 12", b"[]", b"{\"bytes\": \"12\"}", b"\xff\xfe"],
                         ids=["cut", "a list", "a string size", "not text"])
def test_a_sidecar_that_is_not_its_json_record_falls_back_to_the_checkpoint_before(tmp_path, record):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_atomic({"step": step}, folder / f"checkpoint-{step:08d}.pt")
    checkpoint.sidecar(folder / "checkpoint-00000002.pt").write_bytes(record)
    reports = []
    path, state = checkpoint.latest_good(tmp_path, report=reports.append)
    assert state == {"step": 1} and path.name == "checkpoint-00000001.pt"
    assert reports == [f"warning: {folder}/checkpoint-00000002.json is damaged (not the JSON record of a size and "
                       f"sha256): {folder}/checkpoint-00000002.pt cannot be verified; trying the checkpoint before it"]


def test_a_moved_run_folder_resumes_and_a_lone_checkpoint_is_loaded_only_on_request(demo_shards, tmp_path, capsys):
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "renamed"
    train_tiny(demo_shards["train"], first, "run.max_steps=2")
    moved.parent.mkdir()
    first.rename(moved)
    train_tiny(demo_shards["train"], moved, "run.max_steps=3")  # run.name and run.out_dir differ: where it lives
    assert "checkpoint-00000002.pt at step 2" in capsys.readouterr().out
    assert checkpoint.load(checkpoint.latest_checkpoint(moved))["step"] == 3
    lone = tmp_path / "copied" / "checkpoint-00000003.pt"  # copied without its .json
    lone.parent.mkdir()
    lone.write_bytes(checkpoint.latest_checkpoint(moved).read_bytes())
    with pytest.raises(CheckpointError, match="checkpoint-00000003.pt has no checkpoint-00000003.json: it was never "
                                              "finished. If this file .* add run.trust_unverified_checkpoint=true"):
        train_tiny(demo_shards["train"], tmp_path / "from_copy", "run.max_steps=4", f"run.resume={lone}")
    train_tiny(demo_shards["train"], tmp_path / "from_copy", "run.max_steps=4", f"run.resume={lone}",
               "run.trust_unverified_checkpoint=true")
    assert f"resumed from {lone} at step 3" in capsys.readouterr().out
    assert checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "from_copy"))["step"] == 4


def test_another_batch_size_on_resume_is_replaced_with_a_warning(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train_tiny(demo_shards["train"], run, "run.max_steps=1")  # data.batch_size=8 on 1 rank: global batch 8
    train_tiny(demo_shards["train"], run, "run.max_steps=2", "data.batch_size=4")
    assert "warning: data.batch_size=4 is not used: on 1 rank(s) it would make a global batch of 4, and a resume " \
           "keeps the checkpoint's global batch of 8, so data.batch_size is 8" in capsys.readouterr().err
    assert checkpoint.load(checkpoint.latest_checkpoint(run))["loader"]["global_batch_size"] == 8


def test_a_second_trainer_on_the_same_run_folder_is_refused(demo_shards, tmp_path):
    run = tmp_path / "run"
    lock = lock_run(run)
    try:
        with pytest.raises(FolderBusy, match="in use by another trainer .*pid"):
            train_tiny(demo_shards["train"], run, "run.max_steps=1")
    finally:
        lock.release()
    train_tiny(demo_shards["train"], run, "run.max_steps=1")  # free again


def test_resume_reports_every_difference_and_refuses_those_that_change_the_run(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train_tiny(demo_shards["train"], run, "run.max_steps=2")
    with pytest.raises(ValueError, match="optim.lr, run.precision would not continue"):
        train_tiny(demo_shards["train"], run, "run.max_steps=3", "optim.lr=0.001", "run.precision=bf16",
                   "run.log_every=2")
    output = capsys.readouterr().out
    assert "run.log_every was 1 in the checkpoint, now 2" in output and "optim.lr was 0.004" in output
    train_tiny(demo_shards["train"], run, "run.max_steps=3", "optim.lr=0.001", "run.accept_config_changes=true")
    assert checkpoint.load(checkpoint.latest_checkpoint(run))["step"] == 3


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0"), ("optim.lr=-0.1", "optim.lr=-0.1"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints=0"), ("data.backend=jax", "data.backend"),
])
def test_impossible_config_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("harmony/demo", [override])


def test_checkpoint_load_verifies_its_checksum(tmp_path):
    path = checkpoint.save_atomic({"weights": torch.arange(1000.0)}, tmp_path / "checkpoint-00000001.pt")
    assert checkpoint.load(path)["weights"].sum() == 499500
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)
