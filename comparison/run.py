"""`make compare`: methods side by side on the same shards, budget and evaluations, each with one or more seeds, in
one report with error bars.

    python -m comparison.run --name demo --methods "clip harmony" --seeds "0 1 2" --budget epochs:8 \
        --shards shards/demo/train --zeroshot shards/demo/source/heldout ...
    python -m comparison.run ... --nproc 8                       # each run on 8 GPUs (torchrun)
    python -m comparison.run ... --executor slurm --slurm-args "partition=gpu time=1440" --nproc 8

Each (method, seed) is a run: the method's preset (train.presets) trained as an ordinary run folder,
runs/compare/<name>/<method>/seed<seed>/, by train.pretrain with that seed and the budget's steps
(comparison.budget), to each of --eval-points evenly spaced steps in turn, and evaluated there with
evaluation.run's evaluations (comparison.execute). With --nproc N each training runs under torchrun with N
ranks, as `make pretrain NPROC=N` (each rank the preset's batch): an epoch is an epoch, a FLOPs budget counts the
whole job's FLOPs, a time budget is the job's wall-clock. The runs go one after another on this machine (--executor
local), or all at once as Slurm jobs through submitit (--executor slurm; comparison.slurm), requeued when
preempted; run again, the command shows each job's state and writes the report from the runs that have finished.

plan.json (comparison.plan) records every run with the fingerprint of what can change its result. Run again,
the same command continues where it stopped (a trainer resumes exactly from its last checkpoint; finished runs and
evaluations are not redone); more methods or seeds train only what is new; a run whose settings, shards,
evaluation sets or code changed is refused naming the change, or with --accept-changes kept and marked in the
report. A run that fails (an error, out of memory) is reported failed and the others go on; the next run of the
command tries it again. SIGINT/SIGTERM stop the trainer at a checkpoint, then the comparison.
Writes runs/compare/<name>/report.md (printed), report.json and its charts (comparison.report: mean +- std over
seeds, each method's difference to --reference with a paired-bootstrap 95% interval), and exits 0 only when every
run finished; else its last line says how many finished and which failed or did not.
The comparison's folder is locked while it runs (datapipe.common.folder_lock): a second run of the same name is refused.
EVAL_POINTS below 1, a budget that is not finite and above 0, and (once the steps are measured, before anything
trains) a FLOPs or time budget under one step of a method are refused up front.
"""

import argparse
import dataclasses
import hashlib
import shlex
import sys
from pathlib import Path

from comparison import budget as budgets
from comparison import execute, report, slurm
from comparison import plan as plans
from datapipe.common.folder_lock import FolderBusy, FolderLock
from datapipe.common.object_store import RemoteFolder, StorageError, is_remote
from evaluation.run import add_eval_arguments, check_eval_data, eval_data
from evaluation.towers import eval_device
from train import presets
from train.config import RESUME_MAY_CHANGE, check_shards, flatten, load_config, to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("datapipe", "model", "train", "evaluation")
# Config keys that do not change what a method learns (a resume may change them), and optim.epochs, which the
# budget sets. data.batch_size is a setting here: a resume would silently keep the checkpoint's.
NOT_SETTINGS = (RESUME_MAY_CHANGE - {"data.batch_size"}) | {"optim.epochs"}


def code_digest(root=REPO_ROOT):
    """SHA-256 of the Python source that trains and evaluates (paths and contents)."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        if not (root / folder).is_dir():  # a digest of nothing would see no change in the code
            raise FileNotFoundError(f"{root / folder}: the code make compare fingerprints is not there")
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def shards_digest(shards):
    """SHA-256 of the manifest.json of the training shards (data.shards, checked to be there): of a local folder or
    one in object storage; a list of them, one per set, for a list of sets."""
    if isinstance(shards, list):
        return [shards_digest(location) for location in shards]
    folder = shards.rstrip("/").removesuffix("/manifest.json")
    manifest = RemoteFolder(folder).read_bytes("manifest.json") if is_remote(folder) else \
        (Path(folder) / "manifest.json").read_bytes()
    return hashlib.sha256(manifest).hexdigest()


def ranks(args):
    return args.nproc * args.nodes


def run_config(args, out_dir, run):
    return load_config(run["preset"], execute.run_overrides(out_dir, run, args.shards, args.mix_weights,
                                                            args.train_args))


def wanted_runs(args, out_dir, presets, evaluations):
    """{key: run record} of every (method, seed) the command names, each with its fingerprint."""
    shared, wanted = None, {}
    for method, preset in presets.items():
        for seed in args.seeds:
            run = plans.new_run(method, seed, preset, {})
            config = run_config(args, out_dir, run)
            if shared is None:
                check_shards(config.data)  # the shards as every run reads them: the overrides set them
                shared = {"shards": config.data.shards, "shards_manifest_sha256": shards_digest(config.data.shards),
                          "evaluations": dataclasses.asdict(evaluations), "budget": str(budgets.parse(args.budget)),
                          "eval_points": args.eval_points, "ranks": ranks(args), "code_sha256": code_digest()}
            run["fingerprint"] = {"config": {key: value for key, value in flatten(to_dict(config)).items()
                                             if key not in NOT_SETTINGS}, **shared}
            wanted[plans.run_key(method, seed)] = run
    return wanted


def eval_steps(steps, points):
    """`points` evenly spaced steps ending at `steps`."""
    return sorted({max(1, round(steps * index / points)) for index in range(1, points + 1)})


def measure_methods(plan, out_dir, args, budget, keys):
    """Each method's measured step (FLOPs, seconds) once, then the steps and evaluation points of the runs `keys`
    that have none yet, kept in the plan; returns {run key: error} of those that failed (tried again next time)."""
    failures, runs = {}, plan["runs"]
    for key in keys:
        method = runs[key]["method"]
        if method not in plan["measured"] and not any(runs[other]["method"] == method for other in failures):
            print(f"compare: measuring a training step of {method}", flush=True)
            try:
                plan["measured"][method] = budgets.measure(run_config(args, out_dir, runs[key]),
                                                           budgets.TIMED_STEPS if budget.kind == "time" else 0,
                                                           ranks(args))
            except Exception as error:  # noqa: BLE001 - any failure of one method is reported, others go on
                failures[key] = f"measuring a step: {type(error).__name__}: {error}"
            plans.save(out_dir, plan)
    if not any("steps" in run for run in runs.values()):
        refuse_below_one_step(out_dir, budget, plan["measured"])
    for key in keys:
        run = runs[key]
        if run["method"] in plan["measured"] and "steps" not in run:
            try:
                run["steps"], run["epochs"] = budgets.steps_and_epochs(budget, plan["measured"][run["method"]],
                                                                       plan["measured"])
            except ValueError as error:
                failures[key] = str(error)
                continue
            run["eval_steps"] = eval_steps(run["steps"], args.eval_points)
        elif key not in failures and run["method"] not in plan["measured"]:
            failures[key] = next(error for other, error in failures.items()
                                 if runs[other]["method"] == run["method"])
    plans.save(out_dir, plan)
    return failures


def refuse_below_one_step(out_dir, budget, measured):
    """Before any run is planned, a budget under one training step of a measured method is refused; the plan goes
    with it, so that the same COMPARE_NAME can be run again with a larger budget."""
    try:
        budgets.check_one_step_each(budget, measured)
    except ValueError:
        (out_dir / plans.PLAN_FILE).unlink(missing_ok=True)
        raise


def is_finished(out_dir, run):
    return "eval_steps" in run and all(execute.result_path(out_dir / run["run_dir"], step).is_file()
                                       for step in run["eval_steps"])


def run_here(plan, out_dir, args, evaluations, keys):
    """The runs `keys`, one after another in this process's children; {key: error} of those that failed."""
    failures, trainers = {}, execute.Trainers()
    launch = execute.Launch(nproc=args.nproc, torchrun_args=tuple(args.torchrun_args))
    try:
        for key in keys:
            try:
                execute.run_one(trainers, out_dir, plan["runs"][key], args, evaluations, launch)
            except execute.MethodFailed as error:
                failures[key] = str(error)
                print(f"compare: {key} failed: {error}; going on with the others", file=sys.stderr, flush=True)
    finally:
        trainers.restore()
    return failures


def run_as_jobs(plan, out_dir, args, evaluations, keys):
    """Submit every run of `keys` that has no active job (submitit); wait for them with --wait (always for
    submitit_local, whose jobs live with this process). Returns ({key: error} of failed jobs, {key: state} of
    those still queued or running)."""
    executor, nodes = slurm.make_executor(args.executor, out_dir, args.slurm_args, args.nproc)
    states = {key: slurm.job_state(out_dir, plan["runs"][key]) for key in keys}
    jobs = {}
    for key in keys:
        if slurm.is_active(states[key]):
            continue
        job = executor.submit(slurm.RunJob(out_dir, key, args, evaluations, args.nproc, nodes, args.torchrun_args))
        plan["runs"][key]["job"] = {"executor": args.executor, "id": job.job_id}
        jobs[key] = job
        print(f"compare: {key} submitted as job {job.job_id}", flush=True)
    plans.save(out_dir, plan)
    if args.wait or args.executor == "submitit_local":
        for job in jobs.values():
            job.wait()
    states = {key: jobs[key].state if key in jobs else slurm.job_state(out_dir, plan["runs"][key]) for key in keys}
    failures, active = {}, {}
    for key, state in states.items():
        print(f"compare: {key}: job {plan['runs'][key]['job']['id']} {state}", flush=True)
        if slurm.is_active(state):
            active[key] = state
        elif not is_finished(out_dir, plan["runs"][key]):
            failures[key] = job_failure(jobs.get(key), out_dir, plan["runs"][key], state)
    return failures, active


def job_failure(job, out_dir, run, state):
    """Why a run's job ended without finishing the run: its exception, else the trainer's status, else its state."""
    error = job.exception() if job is not None and job.done() else None
    if error is not None:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"job {job.job_id}: {lines[-1] if lines else type(error).__name__}"
    status = execute.read_status(out_dir / run["run_dir"]) or {}
    return status.get("error") or f"job {run['job']['id']} ended {state} before the run finished"


def write_report(out_dir, plan, args, failures, active):
    """report.md/json and the charts from every run of the plan (also those the command did not name)."""
    runs = {}
    for key, run in plan["runs"].items():
        run_dir = out_dir / run["run_dir"]
        failure = failures.get(key) or (f"job {active[key].lower()}" if key in active else None)
        runs.setdefault(run["method"], {})[run["seed"]] = {
            "run_dir": run_dir, "entry": {**run, "measured": plan["measured"].get(run["method"], {})},
            "evaluations": execute.read_evaluations(run_dir), "failure": failure,
            "changed": run["accepted_changes"], "active": key in active}
    first = next(iter(plan["runs"].values()))["fingerprint"]
    budget = budgets.parse(first["budget"])
    amount = ""
    if budget.kind == "flops":
        amount = f" = {budgets.flops_amount(budget, plan['measured']):.3g} FLOPs"
    seeds = sorted({run["seed"] for run in plan["runs"].values()})
    header = [f"Budget: **{first['budget']}**{amount} (equal {budget.kind}); seeds {', '.join(map(str, seeds))}; "
              f"{first['ranks']} rank(s) per run; shards {described_shards(first)}; code sha256 "
              f"{first['code_sha256'][:12]}.",
              "Training FLOPs: the model's own count (torch FlopCounterMode) of real steps times the steps "
              "trained. Training time: the trainer's step times in metrics.jsonl. Results at the last evaluated "
              f"step; each run's folder is {out_dir}/<method>/seed<seed>/."]
    return report.write_comparison(out_dir, args.name, header, plan, runs, args.reference, args.publish)


def described_shards(fingerprint):
    """The report's words for the training shards: each set with its manifest's digest, then a mixture's weights."""
    locations, digests = fingerprint["shards"], fingerprint["shards_manifest_sha256"]
    if isinstance(locations, str):
        locations, digests = [locations], [digests]
    sets = ", ".join(f"{location} (manifest sha256 {digest[:12]})" for location, digest in zip(locations, digests,
                                                                                             strict=True))
    weights = fingerprint["config"]["data.mix_weights"]
    return f"{sets} weighted {weights}" if weights else sets


def compare(args, evaluations):
    """Train and evaluate every run with the comparison's folder locked; (the report's table, {method: summary})."""
    budget = budgets.parse(args.budget)
    chosen = presets.resolve(args.methods.split(), args.scale)
    budgets.check_reference(budget, list(chosen))
    out_dir = Path(args.out) / args.name
    wanted = wanted_runs(args, out_dir, chosen, evaluations)
    with FolderLock(out_dir, "make compare", "wait for that comparison to end, stop it, or give this one another "
                                             "COMPARE_NAME"):
        plan = plans.load(out_dir)
        plans.add_runs(plan, wanted, args.accept_changes, str(out_dir))
        plans.save(out_dir, plan)
        failures = measure_methods(plan, out_dir, args, budget, list(wanted))
        to_run = [key for key in wanted if key not in failures and not is_finished(out_dir, plan["runs"][key])]
        active = {}
        if args.executor == "local":
            failures.update(run_here(plan, out_dir, args, evaluations, to_run))
        elif to_run:
            job_failures, active = run_as_jobs(plan, out_dir, args, evaluations, to_run)
            failures.update(job_failures)
        return write_report(out_dir, plan, args, failures, active)


def check_arguments(args):
    """Refuse, before anything is read or trained, values that cannot be: EVAL_POINTS, SEEDS, NPROC, BUDGET."""
    if args.eval_points < 1:
        raise ValueError(f"EVAL_POINTS={args.eval_points} (--eval-points): the evaluations along each method's "
                         "training must be a whole number of 1 or more")
    if args.nproc < 1 or args.nodes < 1:
        raise ValueError(f"NPROC={args.nproc} and nodes={args.nodes}: the ranks per node and the nodes of each run "
                         "must be whole numbers of 1 or more")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split()]
    except ValueError:
        raise ValueError(f"SEEDS={args.seeds!r} (--seeds): whole numbers separated by spaces, e.g. \"0 1 2\"") from None
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"SEEDS={' '.join(map(str, args.seeds))!r} (--seeds): one or more different whole numbers "
                         "of 0 or more")
    if args.executor == "local" and args.nodes > 1:
        raise ValueError("several nodes per run need a cluster: COMPARE_EXECUTOR=slurm with nodes=N in SLURM_ARGS")
    budgets.parse(args.budget)


def outcome(methods, report_path):
    """The last line of a comparison: how many methods finished, and which failed or did not finish."""
    said = [f"{sum(summary['status'] == 'finished' for summary in methods.values())} of {len(methods)} methods "
            "finished"]
    for status in ("failed", "not finished"):
        names = [method for method, summary in methods.items() if summary["status"] == status]
        if names:
            said.append(f"{len(names)} {status} ({', '.join(names)})")
    return f"compare: {', '.join(said)}: see {report_path}"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="demo", help="the comparison's folder under --out")
    parser.add_argument("--methods", default="", help="methods, space-separated (default: every one with a preset)")
    parser.add_argument("--scale", default="demo", help="presets <method>/<scale>.yaml (default: demo)")
    parser.add_argument("--budget", default="epochs:8", help="epochs:N | flops:X | flops:<method>@<epochs> | time:S")
    parser.add_argument("--shards", default="shards/demo/train",
                        help="training shards as data.shards takes them: a make shards output folder, its s3://, "
                             "gs:// or hf:// location, or a list of them, e.g. \"[shards/a/train, s3://bucket/b/train]\"")
    parser.add_argument("--mix-weights", default="", help="one weight per set of a --shards list, as data.mix_weights "
                                                          "(e.g. \"[1, 2]\"); default 1 each")
    parser.add_argument("--seeds", default="0", help="seeds, space-separated: each method trains once per seed")
    parser.add_argument("--reference", default="clip", help="the method every other is compared with")
    parser.add_argument("--eval-points", type=int, default=4, help="evaluations along each method's training")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--publish", default=None, help="also write report.md and the charts to this folder (e.g. "
                        "docs/compare/<name>: the documentation shows the report as the command wrote it)")
    parser.add_argument("--train-args", nargs="*", default=[], help="key=value overrides for every method")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per node of each run (torchrun)")
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)  # set from SLURM_ARGS nodes=N
    parser.add_argument("--torchrun-args", default="", type=shlex.split,
                        help="torchrun's own options for each run, as one string (make compare: TORCHRUN_ARGS)")
    parser.add_argument("--executor", choices=slurm.EXECUTORS, default="local",
                        help="local: the runs one after another here; slurm: one Slurm job per run (submitit); "
                             "submitit_local: the same jobs through submitit on this machine")
    parser.add_argument("--slurm-args", default="", help="key=value: partition, account, qos, constraint, time "
                                                         "(minutes), nodes, gpus_per_node, cpus_per_task, mem_gb")
    parser.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs to end")
    parser.add_argument("--accept-changes", action="store_true",
                        help="keep runs trained with other settings or code (marked in the report)")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    return parser, args


def main(argv=None):
    parser, args = parse_arguments(argv)
    evaluations = eval_data(parser, args)
    try:
        args.nodes = slurm.parse_slurm_args(args.slurm_args).get("nodes", 1)
        check_arguments(args)
        args.device_choice, args.device = args.device, eval_device(args.device)
        check_eval_data(evaluations)
        table, methods = compare(args, evaluations)
    except execute.Stopped as stop:
        raise SystemExit(f"compare stopped ({stop}); every trainer is at a checkpoint. Run the same command "
                         "again to continue.") from None
    except (ValueError, FileNotFoundError, StorageError, FolderBusy) as error:
        raise SystemExit(f"error: {error}") from None
    print(table, flush=True)
    report_path = Path(args.out) / args.name / "report.md"
    if any(summary["status"] != "finished" for summary in methods.values()):
        raise SystemExit(outcome(methods, report_path))
    print(f"compare done: {report_path}, report.json and its charts")


if __name__ == "__main__":
    main()
