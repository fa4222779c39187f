"""One run of a comparison, (method, seed): trained to each evaluation point in turn and evaluated there.

Each training segment is train.pretrain in a process of its own, resuming from the run's last checkpoint: one
process for one rank, or under torchrun (train.launch, as `make pretrain NPROC=N`) for several, on this node or, in
a Slurm job, across the job's nodes. The evaluation runs in this process (on the first node only).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from datapipe.common.manifest import write_atomic
from evaluation.run import evaluate
from train.preemption import EXIT_PREEMPTED, LAUNCHER_ENV
from train.run_folder import read_status

EVALUATIONS = "compare_evals"  # <run>/compare_evals/step-<step>.json: the evaluation at that step
ERROR_TAIL_CHARS = 2000
MEMORY_POLL_S = 0.5
LOG_POLL_S = 0.1
TRAINER_LOG = "trainer_stderr.log"  # <run>/trainer_stderr.log: every trainer run's stderr, appended
STOPPED_LAUNCHER = 128 + signal.SIGTERM  # train.launch after forwarding SIGTERM to trainers that checkpointed


class MethodFailed(Exception):
    pass


class Stopped(Exception):
    pass


@dataclass(frozen=True)
class Launch:
    """How a run's trainer starts: `nproc` ranks on each of `nodes` nodes (this one is `node_rank`); several nodes
    meet at `rendezvous` (host:port); `torchrun_args` are torchrun's own options."""
    nproc: int = 1
    nodes: int = 1
    node_rank: int = 0
    rendezvous: str = ""
    rendezvous_id: str = "compare"
    torchrun_args: tuple = field(default_factory=tuple)

    def command(self, trainer_args):
        """The trainer's command line: train.pretrain itself for one rank, else train.launch (torchrun)."""
        if self.nproc == 1 and self.nodes == 1 and not self.torchrun_args:
            return [sys.executable, "-m", "train.pretrain", *trainer_args]
        where = ["--standalone"] if self.nodes == 1 else [
            f"--nnodes={self.nodes}", f"--node_rank={self.node_rank}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={self.rendezvous}", f"--rdzv_id={self.rendezvous_id}"]
        return [sys.executable, "-m", "train.launch", *where, f"--nproc_per_node={self.nproc}", *self.torchrun_args,
                "-m", "train.pretrain", *trainer_args]


class Trainers:
    """Runs trainer processes one at a time; SIGINT/SIGTERM ask the running one to checkpoint and stop."""

    def __init__(self):
        self.child, self.stop_signal = None, None
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, number, frame):
        self.stop(signal.Signals(number).name)

    def stop(self, reason):
        """Ask the running trainer to end its step and checkpoint; what runs next is refused."""
        self.stop_signal = reason
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s):
        """Wait (without reaping it: the thread that started it does) until the trainer has exited."""
        deadline = time.monotonic() + timeout_s
        while self.child and _alive(self.child.pid) and time.monotonic() < deadline:
            time.sleep(LOG_POLL_S)

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def run(self, command, log_path):
        """Run `command`; its stderr goes to `log_path` (appended; a file, not a pipe, so that the trainer can
        still write when the comparison is killed) and is shown as it comes, its tail kept.
        Returns (exit code, stderr tail, the process's peak resident memory in bytes or None)."""
        if self.stop_signal:
            raise Stopped(self.stop_signal)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            start = log.tell()
            # A session of its own: a terminal's Ctrl-C reaches it only as the SIGTERM sent above, after a step;
            # killed outright, the comparison leaves the trainer to see its launcher gone and checkpoint.
            self.child = subprocess.Popen(command, stderr=log, start_new_session=True,
                                          env={**os.environ, LAUNCHER_ENV: "make compare"})
        tail, peak = bytearray(), [None]

        def pump(child=self.child):
            with open(log_path, "rb") as source:
                source.seek(start)
                while (chunk := source.read(4096)) or child.poll() is None:
                    if not chunk:
                        time.sleep(LOG_POLL_S)
                        continue
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                    tail.extend(chunk)
                    del tail[:-ERROR_TAIL_CHARS]

        def watch(child=self.child):
            while child.poll() is None:
                peak[0] = peak_resident_bytes(child.pid) or peak[0]
                time.sleep(MEMORY_POLL_S)

        threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=watch, daemon=True)]
        for thread in threads:
            thread.start()
        code = self.child.wait()
        threads[0].join()
        self.child = None
        if self.stop_signal:
            raise Stopped(self.stop_signal)
        return code, tail.decode(errors="replace"), peak[0]


def _alive(pid):
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def peak_resident_bytes(pid):
    """The process's peak resident memory so far (Linux VmHWM), or None. Unlike getrusage's ru_maxrss in the
    process itself, it does not start from the peak of the process that launched it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match[1]) * 1024 if match else None


def failure_text(run_dir, code, tail):
    status = read_status(run_dir)
    if status and status.get("state") == "failed" and status.get("error"):
        return status["error"]
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return f"exit code {code}: {lines[-1] if lines else 'no message'}"


def train_to(trainers, run_dir, preset, overrides, epochs, step, launch=Launch()):
    """Train the run to `step` (resuming from its last checkpoint), unless it is there already; returns the
    trainer process's peak resident memory (None when not trained or not known)."""
    status = read_status(run_dir)
    if status and status.get("state") == "finished" and status.get("step") == step:
        return None
    command = launch.command(["--config", preset, *overrides, f"optim.epochs={epochs}", f"run.max_steps={step}"])
    code, tail, peak_bytes = trainers.run(command, Path(run_dir) / TRAINER_LOG)
    if code in (EXIT_PREEMPTED, STOPPED_LAUNCHER):
        raise Stopped("the trainer was stopped")
    if code != 0:
        raise MethodFailed(failure_text(run_dir, code, tail))
    return peak_bytes


def run_overrides(out_dir, run, shards, mix_weights, train_args):
    """The trainer's key=value settings of one run: the comparison's shards and seed, its folder, the user's."""
    run_dir = out_dir / run["run_dir"]
    weights = [f"data.mix_weights={mix_weights}"] if mix_weights else []
    return [f"data.shards={shards}", *weights, f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
            f"run.seed={run['seed']}", *train_args]


def result_path(run_dir, step):
    """Where a run's evaluation at `step` is written."""
    return Path(run_dir) / EVALUATIONS / f"step-{step:08d}.json"


def run_one(trainers, out_dir, run, options, evaluations, launch=Launch()):
    """Train `run` (a plan record) to each of its evaluation points and evaluate it there, skipping what is
    done. options: shards, mix_weights, train_args, device. Only the first node evaluates."""
    run_dir = out_dir / run["run_dir"]
    overrides = run_overrides(out_dir, run, options.shards, options.mix_weights, options.train_args)
    for step in run["eval_steps"]:
        evaluation = result_path(run_dir, step)
        if evaluation.is_file():
            continue
        print(f"compare: {run['method']} seed {run['seed']} to step {step} of {run['steps']}", flush=True)
        peak_bytes = train_to(trainers, run_dir, run["preset"], overrides, run["epochs"], step, launch)
        if launch.node_rank:
            continue
        try:
            results = evaluate(run_dir, evaluations, options.device)
        except Exception as error:  # any failure of one run's evaluation is reported, the others go on
            raise MethodFailed(f"evaluating step {step}: {type(error).__name__}: {error}") from error
        evaluation.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(evaluation, json.dumps({"step": step, "trainer_peak_rss_bytes": peak_bytes,
                                              "results": results}, indent=2))


def read_evaluations(run_dir):
    return [json.loads(path.read_text()) for path in sorted((Path(run_dir) / EVALUATIONS).glob("step-*.json"))]
