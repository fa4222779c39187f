"""`make compare`: methods side by side on the same shards, seed, budget and evaluations, in one report.

    python -m tools.compare.run --name demo --methods "clip harmony" --budget epochs:8 \
        --shards shards/demo/train --zeroshot shards/demo/source/heldout ...
    python -m tools.compare.run ... --shards "[shards/cc3m/train, s3://bucket/cc12m/train]" --mix-weights "[1, 2]"

--shards and --mix-weights take what data.shards and data.mix_weights do: a training-shard folder, its s3://,
gs:// or hf:// location, or a list of them mixed by one weight each.

Each method is its preset (tools.compare.methods) trained as an ordinary run folder,
runs/compare/<name>/<method>/, by train.pretrain in a process of its own, with the comparison's seed and
its budget's steps (tools.compare.budget). It trains to each of --eval-points evenly spaced steps in turn
(run.max_steps, which a resume may change) and is evaluated there with tools.eval.run's evaluations, so
every method has the same evaluations along the way. The comparison's settings are fixed in plan.json at its
start: methods and their full configs, budget, seed, every shard set's manifest, the evaluations, and the code's
digest. Run again, the same command continues where it stopped (a trainer resumes exactly from its last
checkpoint; finished methods and evaluations are not redone); other settings are refused with what differs.
A method that fails (an error, out of memory) is reported failed with its error and the others go on; the
next run of the command tries it again. SIGINT/SIGTERM stop the trainer at a checkpoint, then the comparison.
Writes runs/compare/<name>/report.md (printed), report.json, metrics_vs_compute.png and loss_curves.png, and exits
0 only when every method finished; else its last line says how many finished and which failed or did not.
The comparison's folder is locked while it runs (datapipe.folder_lock): a second run of the same name is refused.
EVAL_POINTS below 1, a budget that is not finite and above 0, and (once the steps are measured, before anything
trains) a FLOPs or time budget under one step of a method are refused up front.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from datapipe.folder_lock import FolderBusy, FolderLock
from datapipe.manifest import write_atomic
from datapipe.object_store import RemoteFolder, StorageError, is_remote
from tools.compare import budget as budgets
from tools.compare import methods as method_presets
from tools.compare import report
from tools.eval.run import add_eval_arguments, check_eval_data, eval_data, evaluate
from tools.eval.towers import eval_device
from train.config import RESUME_MAY_CHANGE, check_shards, differences, flatten, load_config, to_dict
from train.preemption import EXIT_PREEMPTED, LAUNCHER_ENV
from train.run_folder import read_status

PLAN_FILE = "plan.json"
EVALUATIONS = "compare_evals"  # <run>/compare_evals/step-<step>.json: the evaluation at that step
REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("datapipe", "model", "train", "tools/eval")
ERROR_TAIL_CHARS = 2000
MEMORY_POLL_S = 0.5
LOG_POLL_S = 0.1
TRAINER_LOG = "trainer_stderr.log"  # <run>/trainer_stderr.log: every trainer run's stderr, appended
# Config keys that do not change what a method learns (a resume may change them), and optim.epochs, which the
# budget sets. data.batch_size is a setting here: a resume would silently keep the checkpoint's.
NOT_SETTINGS = (RESUME_MAY_CHANGE - {"data.batch_size"}) | {"optim.epochs"}


class MethodFailed(Exception):
    pass


class Stopped(Exception):
    pass


def code_digest(root=REPO_ROOT):
    """SHA-256 of the Python source that trains and evaluates (paths and contents)."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
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


def method_overrides(out_dir, method, args):
    weights = [f"data.mix_weights={args.mix_weights}"] if args.mix_weights else []
    return [f"data.shards={args.shards}", *weights, f"run.out_dir={out_dir}", f"run.name={method}",
            f"run.seed={args.seed}", *args.train_args]


def settings(args, out_dir, presets, evaluations):
    """What the comparison is: everything that, changed, would mix results (compared on every run). A mixture's
    weights are in the methods' configs (data.mix_weights)."""
    configs = {}
    for method, preset in presets.items():
        config = load_config(preset, method_overrides(out_dir, method, args))
        configs[method] = {"preset": preset, "config": {key: value for key, value in flatten(to_dict(config)).items()
                                                        if key not in NOT_SETTINGS}}
    check_shards(config.data)  # every method's shards: the overrides set them after the preset
    shards = config.data.shards
    return {"methods": configs, "budget": str(budgets.parse(args.budget)), "seed": args.seed,
            "shards": shards, "shards_manifest_sha256": shards_digest(shards),
            "eval_points": args.eval_points, "evaluations": dataclasses.asdict(evaluations),
            "train_args": list(args.train_args), "code_sha256": code_digest()}


def check_same(plan_path, saved, current):
    changed = differences(saved, current)
    if changed:
        said = "; ".join(f"{key}: {before!r} -> {now!r}" for key, before, now in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ValueError(f"{plan_path.parent} holds a comparison made with other settings: {said}{more}. Run it "
                         f"with its own settings to continue it, or start another (make compare COMPARE_NAME=...)")


def load_or_start_plan(out_dir, current):
    path = out_dir / PLAN_FILE
    if path.is_file():
        plan = json.loads(path.read_text())
        check_same(path, plan["settings"], current)
        return plan
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {"settings": current, "methods": {method: {"preset": entry["preset"]}
                                             for method, entry in current["methods"].items()}}
    save_plan(out_dir, plan)
    return plan


def save_plan(out_dir, plan):
    write_atomic(out_dir / PLAN_FILE, json.dumps(plan, indent=2))


def eval_steps(steps, points):
    """`points` evenly spaced steps ending at `steps`."""
    return sorted({max(1, round(steps * index / points)) for index in range(1, points + 1)})


class Trainers:
    """Runs train.pretrain processes one at a time; SIGINT/SIGTERM ask the running one to checkpoint and stop."""

    def __init__(self):
        self.child, self.stop_signal = None, None
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, number, frame):
        self.stop_signal = signal.Signals(number).name
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # the trainer ends its step and checkpoints

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


def train_to(trainers, run_dir, preset, overrides, epochs, step):
    """Train the method's run to `step` (resuming from its last checkpoint), unless it is there already;
    returns the trainer process's peak resident memory (None when not trained or not known)."""
    status = read_status(run_dir)
    if status and status.get("state") == "finished" and status.get("step") == step:
        return None
    command = [sys.executable, "-m", "train.pretrain", "--config", preset, *overrides, f"optim.epochs={epochs}",
               f"run.max_steps={step}"]
    code, tail, peak_bytes = trainers.run(command, Path(run_dir) / TRAINER_LOG)
    if code == EXIT_PREEMPTED:
        raise Stopped("the trainer was stopped")
    if code != 0:
        raise MethodFailed(failure_text(run_dir, code, tail))
    return peak_bytes


def run_method(trainers, out_dir, method, entry, args, evaluations):
    run_dir = out_dir / method
    overrides = method_overrides(out_dir, method, args)
    for step in entry["eval_steps"]:
        result_path = run_dir / EVALUATIONS / f"step-{step:08d}.json"
        if result_path.is_file():
            continue
        print(f"compare: {method} to step {step} of {entry['steps']}", flush=True)
        peak_bytes = train_to(trainers, run_dir, entry["preset"], overrides, entry["epochs"], step)
        try:
            results = evaluate(run_dir, evaluations, args.device)
        except Exception as error:  # any failure of one method's evaluation is reported, others go on
            raise MethodFailed(f"evaluating step {step}: {type(error).__name__}: {error}") from error
        result_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(result_path, json.dumps({"step": step, "trainer_peak_rss_bytes": peak_bytes,
                                              "results": results}, indent=2))


def measure_methods(plan, out_dir, args, budget):
    """Each method's measured step (FLOPs, seconds), then its steps and evaluation points, kept in the plan;
    returns {method: error} of those that failed (tried again by the next run)."""
    failures = {}
    for method, entry in plan["methods"].items():
        if "measured" not in entry:
            print(f"compare: measuring a training step of {method}", flush=True)
            overrides = method_overrides(out_dir, method, args)
            try:
                entry["measured"] = budgets.measure(load_config(entry["preset"], overrides),
                                                    budgets.TIMED_STEPS if budget.kind == "time" else 0)
            except Exception as error:  # noqa: BLE001 - any failure of one method is reported, others go on
                failures[method] = f"measuring a step: {type(error).__name__}: {error}"
            save_plan(out_dir, plan)
    measured = {method: entry["measured"] for method, entry in plan["methods"].items() if "measured" in entry}
    if not any("steps" in entry for entry in plan["methods"].values()):
        refuse_below_one_step(out_dir, budget, measured)
    for method, entry in plan["methods"].items():
        if "measured" in entry and "steps" not in entry:
            try:
                entry["steps"], entry["epochs"] = budgets.steps_and_epochs(budget, entry["measured"], measured)
            except ValueError as error:
                failures[method] = str(error)
                continue
            entry["eval_steps"] = eval_steps(entry["steps"], args.eval_points)
    save_plan(out_dir, plan)
    return failures


def refuse_below_one_step(out_dir, budget, measured):
    """Before any method is planned, a budget under one training step of a measured method is refused; the plan
    goes with it, so that the same COMPARE_NAME can be run again with a larger budget."""
    try:
        budgets.check_one_step_each(budget, measured)
    except ValueError:
        (out_dir / PLAN_FILE).unlink(missing_ok=True)
        raise


def read_evaluations(run_dir):
    return [json.loads(path.read_text()) for path in sorted((run_dir / EVALUATIONS).glob("step-*.json"))]


def described_shards(settings_):
    """The report's words for the training shards: each set with its manifest's digest, then a mixture's weights."""
    locations, digests = settings_["shards"], settings_["shards_manifest_sha256"]
    if isinstance(locations, str):
        locations, digests = [locations], [digests]
    sets = ", ".join(f"{location} (manifest sha256 {digest[:12]})" for location, digest in zip(locations, digests,
                                                                                             strict=True))
    weights = next(iter(settings_["methods"].values()))["config"]["data.mix_weights"]
    return f"{sets} weighted {weights}" if weights else sets


def write_report(out_dir, plan, args, failures):
    settings_, entries = plan["settings"], plan["methods"]
    budget = budgets.parse(settings_["budget"])
    methods = {method: report.method_summary(out_dir / method, entry, read_evaluations(out_dir / method),
                                             failures.get(method))
               for method, entry in entries.items()}
    amount = ""
    if budget.kind == "flops":
        measured = {method: entry["measured"] for method, entry in entries.items() if "measured" in entry}
        amount = f" = {budgets.flops_amount(budget, measured):.3g} FLOPs"
    header = [f"Budget: **{settings_['budget']}**{amount} (equal {budget.kind}); seed {settings_['seed']}; shards "
              f"{described_shards(settings_)}; code sha256 {settings_['code_sha256'][:12]}.",
              "Training FLOPs: the model's own count (torch FlopCounterMode) of real steps times the steps "
              "trained. Training time: the trainer's step times in metrics.jsonl. Results at the last evaluated "
              f"step; each method's run folder is {out_dir}/<method>/."]
    table = report.write(out_dir, args.name, header, {"name": args.name, "settings": settings_, "plan": entries},
                         methods)
    return table, methods


def compare(args, evaluations):
    """Train and evaluate every method with the comparison's folder locked; (the report's table, {method:
    summary})."""
    budget = budgets.parse(args.budget)
    presets = method_presets.resolve(args.methods.split(), args.scale)
    budgets.check_reference(budget, list(presets))
    out_dir = Path(args.out) / args.name
    current = settings(args, out_dir, presets, evaluations)
    with FolderLock(out_dir, "make compare", "wait for that comparison to end, stop it, or give this one another "
                                             "COMPARE_NAME"):
        return compare_in(out_dir, load_or_start_plan(out_dir, current), args, evaluations, budget)


def compare_in(out_dir, plan, args, evaluations, budget):
    """compare()'s work in its locked folder `out_dir`, from its `plan`."""
    failures = measure_methods(plan, out_dir, args, budget)
    trainers = Trainers()
    try:
        for method, entry in plan["methods"].items():
            if method in failures:
                continue
            try:
                run_method(trainers, out_dir, method, entry, args, evaluations)
            except MethodFailed as error:
                failures[method] = str(error)
                print(f"compare: {method} failed: {error}; going on with the others", file=sys.stderr, flush=True)
    finally:
        trainers.restore()
    return write_report(out_dir, plan, args, failures)


def check_arguments(args):
    """Refuse, before anything is read or trained, an EVAL_POINTS below 1 or a BUDGET that cannot be."""
    if args.eval_points < 1:
        raise ValueError(f"EVAL_POINTS={args.eval_points} (--eval-points): the evaluations along each method's "
                         "training must be a whole number of 1 or more")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="demo", help="the comparison's folder under --out")
    parser.add_argument("--methods", default="", help="methods, space-separated (default: every one with a preset)")
    parser.add_argument("--scale", default="demo", help="presets <method>_<scale>.yaml (default: demo)")
    parser.add_argument("--budget", default="epochs:8", help="epochs:N | flops:X | flops:<method>@<epochs> | time:S")
    parser.add_argument("--shards", default="shards/demo/train",
                        help="training shards as data.shards takes them: a make shards output folder, its s3://, "
                             "gs:// or hf:// location, or a list of them, e.g. \"[shards/a/train, s3://bucket/b/train]\"")
    parser.add_argument("--mix-weights", default="", help="one weight per set of a --shards list, as data.mix_weights "
                                                          "(e.g. \"[1, 2]\"); default 1 each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-points", type=int, default=4, help="evaluations along each method's training")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--train-args", nargs="*", default=[], help="key=value overrides for every method")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    evaluations = eval_data(parser, args)
    try:
        check_arguments(args)
        args.device = eval_device(args.device)
        check_eval_data(evaluations)
        table, methods = compare(args, evaluations)
    except Stopped as stop:
        raise SystemExit(f"compare stopped ({stop}); every trainer is at a checkpoint. Run the same command "
                         "again to continue.") from None
    except (ValueError, FileNotFoundError, StorageError, FolderBusy) as error:
        raise SystemExit(f"error: {error}") from None
    print(table, flush=True)
    report_path = Path(args.out) / args.name / "report.md"
    if any(summary["status"] != "finished" for summary in methods.values()):
        raise SystemExit(outcome(methods, report_path))
    print(f"compare done: {Path(args.out) / args.name}/report.md, report.json, metrics_vs_compute.png, "
          "loss_curves.png")


if __name__ == "__main__":
    main()
