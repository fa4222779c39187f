"""A comparison's runs as cluster jobs through submitit (as DINOv2 launches its training): one job per (method,
seed), all submitted at once so they run in parallel, each requeued when preempted.

    COMPARE_EXECUTOR=slurm SLURM_ARGS="partition=gpu account=lab time=1440 nodes=1" NPROC=8 make compare ...

A job runs comparison.execute.run_one on each of its nodes: torchrun (train.launch) with NPROC ranks per node,
the nodes meeting at the first one, which also evaluates. On preemption or its time limit, Slurm signals the job
(USR2, `slurm_signal_delay_s` before the end); submitit calls `RunJob.checkpoint`, which asks the trainer to end its
step and checkpoint, then requeues the job, which resumes exactly. `COMPARE_EXECUTOR=submitit_local` runs the same
jobs through submitit's local executor on this machine (for trying the cluster path, and for the tests).
"""

import copy
import socket

import submitit

from comparison import execute
from comparison import plan as plans
from evaluation.towers import eval_device

EXECUTORS = ("local", "slurm", "submitit_local")
JOBS_FOLDER = "jobs"  # <comparison>/jobs/: submitit's job scripts, logs and results
STOP_TIMEOUT_S = 300  # how long a checkpoint on preemption may take
RENDEZVOUS_PORT = 29400
# SLURM_ARGS words (key=value) and the submitit parameter each sets; any other key is passed as submitit's own.
SLURM_KEYS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
              "constraint": "slurm_constraint", "time": "timeout_min", "exclude": "slurm_exclude"}
NUMBERS = ("timeout_min", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_signal_delay_s")

_running = []  # the Trainers of the job running in this process, for its checkpoint on preemption


def parse_slurm_args(text):
    """{submitit parameter: value} of SLURM_ARGS ("partition=gpu time=240 nodes=2 ...")."""
    parameters = {}
    for word in text.split():
        key, equals, value = word.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"SLURM_ARGS: {word!r} is not key=value (e.g. \"partition=gpu account=lab time=1440 "
                             "nodes=1 gpus_per_node=8\")")
        name = SLURM_KEYS.get(key, key)
        try:
            parameters[name] = int(value) if name in NUMBERS else value
        except ValueError:
            raise ValueError(f"SLURM_ARGS: {key}={value!r} must be a whole number") from None
    return parameters


def make_executor(kind, out_dir, slurm_args, nproc):
    """submitit's executor for `kind` (slurm or submitit_local), its jobs in <comparison>/jobs/: one task per node
    (each starts torchrun with `nproc` ranks), NPROC GPUs per node unless SLURM_ARGS says otherwise."""
    executor = submitit.AutoExecutor(folder=out_dir / JOBS_FOLDER, cluster="slurm" if kind == "slurm" else "local")
    parameters = {"tasks_per_node": 1, "nodes": 1, "timeout_min": 60 * 24, "slurm_signal_delay_s": 120,
                  "gpus_per_node": nproc if kind == "slurm" else 0, **parse_slurm_args(slurm_args)}
    if kind != "slurm":
        parameters = {key: value for key, value in parameters.items() if not key.startswith("slurm_")}
    executor.update_parameters(name="compare", **parameters)
    return executor, parameters["nodes"]


def job_launch(nproc, nodes, torchrun_args):
    """This node's Launch inside a job: rank from submitit's environment, the nodes meeting at the first one."""
    if nodes == 1:
        return execute.Launch(nproc=nproc, torchrun_args=tuple(torchrun_args))
    environment = submitit.JobEnvironment()
    return execute.Launch(nproc=nproc, nodes=environment.num_nodes, node_rank=environment.node,
                          rendezvous=f"{environment.hostnames[0]}:{RENDEZVOUS_PORT}",
                          rendezvous_id=str(environment.job_id), torchrun_args=tuple(torchrun_args))


class RunJob(submitit.helpers.Checkpointable):
    """One run of the comparison in `out_dir` (its plan key `key`), as a job."""

    def __init__(self, out_dir, key, options, evaluations, nproc, nodes, torchrun_args=()):
        self.out_dir, self.key, self.options, self.evaluations = out_dir, key, options, evaluations
        self.nproc, self.nodes, self.torchrun_args = nproc, nodes, tuple(torchrun_args)

    def __call__(self):
        run = plans.load(self.out_dir)["runs"][self.key]
        options = copy.copy(self.options)
        options.device = eval_device(options.device_choice)  # the job's node decides, not the submitting one
        trainers = execute.Trainers()
        _running.append(trainers)
        try:
            execute.run_one(trainers, self.out_dir, run, options, self.evaluations,
                            job_launch(self.nproc, self.nodes, self.torchrun_args))
        finally:
            _running.remove(trainers)
            trainers.restore()
        return f"{self.key} finished on {socket.gethostname()}"

    def checkpoint(self, *args, **kwargs):
        """Preempted or at its time limit: the trainer checkpoints, then the job is requeued to resume."""
        for trainers in _running:
            trainers.stop("preempted")
            trainers.wait_stopped(STOP_TIMEOUT_S)
        return super().checkpoint(*args, **kwargs)


def job_of(out_dir, run):
    """The submitit Job of a run's last submission, or None."""
    job = run.get("job")
    if not job:
        return None
    kind = submitit.SlurmJob if job["executor"] == "slurm" else submitit.local.local.LocalJob
    return kind(folder=out_dir / JOBS_FOLDER, job_id=job["id"])


def job_state(out_dir, run):
    """What the run's job is doing: "" (no job), or its state as the cluster says it (PENDING, RUNNING, ...)."""
    job = job_of(out_dir, run)
    if job is None:
        return ""
    try:
        return job.state
    except Exception as error:  # noqa: BLE001 (the scheduler's tools may fail in many ways)
        return f"UNKNOWN ({type(error).__name__}: {error})"


def is_active(state):
    return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED") \
        or state.startswith("UNKNOWN")
