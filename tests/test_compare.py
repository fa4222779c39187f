"""`make compare` on the tiny demo shards: two methods, a tiny budget. A complete report; a comparison killed in
the middle continues where it stopped without training a finished method again; another budget is refused."""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, write_training_shards
from test_train import tiny

from comparison import budget, execute, plan
from comparison import run as compare_run
from datapipe.common.folder_lock import FolderLock
from evaluation.run import EvalData
from train import presets
from train.run_folder import write_status


def test_the_code_digest_reads_the_code_that_trains_and_evaluates(tmp_path):
    """Every fingerprinted folder is there (a digest of nothing would see no code change), and a change to one of
    its files changes the digest."""
    assert all((compare_run.REPO_ROOT / folder / "__init__.py").is_file() for folder in compare_run.CODE_FOLDERS)
    for folder in compare_run.CODE_FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text("x = 1\n")
    before = compare_run.code_digest(tmp_path)
    (tmp_path / "model" / "code.py").write_text("x = 2\n")
    assert compare_run.code_digest(tmp_path) != before
    (tmp_path / "model" / "code.py").unlink()
    (tmp_path / "model").rmdir()
    with pytest.raises(FileNotFoundError, match="the code make compare fingerprints is not there"):
        compare_run.code_digest(tmp_path)


def test_methods_are_found_from_their_presets():
    found = presets.discover("demo")
    assert found["harmony"] == "harmony/demo" and found["clip"] == "clip/demo" and found["siglip"] == "siglip/demo"
    assert "ablations/clip_text" not in found.values()  # not a demo-scale preset
    assert "base" not in found and "ablations" not in found  # folders of presets that are no method
    with pytest.raises(ValueError, match="no preset for nosuch at scale 'demo'"):
        presets.resolve(["nosuch"], "demo")


def test_budgets_turn_into_steps():
    measured = {"harmony": {"flops_per_step": 10.0, "seconds_per_step": 2.0, "steps_per_epoch": 5},
                "clip": {"flops_per_step": 4.0, "seconds_per_step": 0.5, "steps_per_epoch": 5}}
    assert budget.steps_and_epochs(budget.parse("epochs:3"), measured["clip"], measured) == (15, 3)
    equal_compute = budget.parse("flops:harmony@2")  # 100 FLOPs: 10 harmony steps, 25 clip steps
    assert budget.steps_and_epochs(equal_compute, measured["harmony"], measured) == (10, 2)
    assert budget.steps_and_epochs(equal_compute, measured["clip"], measured) == (25, 5)
    assert budget.steps_and_epochs(budget.parse("time:1m"), measured["clip"], measured) == (120, 24)
    with pytest.raises(ValueError, match="BUDGET='weeks:2'"):
        budget.parse("weeks:2")


def test_a_plan_continues_with_its_own_runs_and_refuses_changed_ones_unless_accepted(tmp_path):
    """The runs of a comparison, written at its start, match themselves on the next run; a changed value is
    refused naming the run and the change (and nothing else), or accepted: the run kept, the change recorded."""
    def wanted(batch_size=32):
        fingerprint = {"config": {"data.batch_size": batch_size, "optim.lr": 0.1}, "budget": "epochs:1"}
        return {"clip/seed0": plan.new_run("clip", 0, "clip/demo", fingerprint)}

    saved = plan.load(tmp_path)
    plan.add_runs(saved, wanted())
    plan.save(tmp_path, saved)
    again = plan.load(tmp_path)
    plan.add_runs(again, json.loads(json.dumps(wanted())))
    assert again == saved
    with pytest.raises(ValueError, match=r"runs made with other settings or code: clip/seed0: "
                                         r"config\.data\.batch_size: 32 -> 64\. Run it"):
        plan.add_runs(again, wanted(64))
    plan.add_runs(again, wanted(64), accept_changes=True)
    assert again["runs"]["clip/seed0"]["accepted_changes"] == ["config.data.batch_size"]
    plan.add_runs(again, wanted(64))  # the accepted fingerprint is the run's now


def test_a_mixture_of_sets_is_in_the_plan_and_a_changed_set_or_weight_is_refused(tmp_path):
    """`--shards "[a, b]" --mix-weights "[1, 0.5]"`: every set's manifest is fingerprinted, the weights are in the
    runs' configs; another manifest for one of the sets, or other weights, is refused."""
    def shards(folder, samples):
        return write_training_shards(folder, np.zeros((samples, 24, 24, 3), dtype=np.uint8), samples_per_shard=4)

    first, second = shards(tmp_path / "a" / "train", 4), shards(tmp_path / "b" / "train", 8)
    out_dir, presets, evaluations = tmp_path / "compare", {"clip": "clip/demo"}, EvalData(zeroshot=str(tmp_path))

    def wanted(mix_weights="[1, 0.5]"):  # of main()'s arguments
        arguments = argparse.Namespace(shards=f"[{first}, {second}]", mix_weights=mix_weights, seeds=[0],
                                       budget="epochs:1", eval_points=1, train_args=["data.batch_size=4"], nproc=1,
                                       nodes=1)
        return compare_run.wanted_runs(arguments, out_dir, presets, evaluations)

    started = plan.load(out_dir)
    plan.add_runs(started, wanted())
    fingerprint = started["runs"]["clip/seed0"]["fingerprint"]
    assert fingerprint["shards"] == [str(first), str(second)]
    assert len(set(fingerprint["shards_manifest_sha256"])) == 2
    assert fingerprint["config"]["data.mix_weights"] == [1.0, 0.5]
    assert compare_run.described_shards(fingerprint).endswith("weighted [1.0, 0.5]")
    with pytest.raises(ValueError, match=r"data.mix_weights: \[1.0, 0.5\] -> \[1.0, 2.0\]"):
        plan.add_runs(started, wanted("[1, 2]"))
    with pytest.raises(ValueError, match=r"3 weight\(s\) for 2 shard set\(s\)"):  # before any plan is written
        wanted("[1, 2, 3]")
    shards(second, 6)  # rebuilt with other samples
    with pytest.raises(ValueError, match=r"other settings or code: clip/seed0: shards_manifest_sha256: \['"):
        plan.add_runs(started, wanted())


@pytest.mark.slow
def test_compare_reports_continues_after_a_kill_and_refuses_another_budget(demo_shards, tmp_path):
    arguments = ["--name", "tiny", "--methods", "clip harmony", "--budget", "epochs:1", "--eval-points", "2",
                 "--shards", str(demo_shards["train"]), "--out", str(tmp_path), "--zeroshot",
                 str(demo_shards["heldout"]), "--train-args", "data.batch_size=32", "data.num_workers=0",
                 "run.log_every=1"]
    clip, harmony = tmp_path / "tiny" / "clip" / "seed0", tmp_path / "tiny" / "harmony" / "seed0"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "comparison.run", *arguments], stdout=log, stderr=log)
        while not (harmony / "metrics.jsonl").is_file() and first.poll() is None:  # harmony's first step
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # as `kill` does: the trainer checkpoints, then the comparison stops
        first.wait(timeout=900)
    said = (tmp_path / "first.log").read_text()
    assert first.returncode != 0 and "compare stopped" in said, said[-2000:]
    assert not (tmp_path / "tiny" / "report.md").exists()
    clip_metrics = (clip / "metrics.jsonl").read_text()

    compare_run.main(arguments)  # the same command: continues
    assert (clip / "metrics.jsonl").read_text() == clip_metrics  # finished: not trained again
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    steps_per_epoch = report["plan"]["measured"]["harmony"]["steps_per_epoch"]
    logged = [json.loads(row)["step"] for row in (harmony / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps_per_epoch + 1))  # every step once: resumed, not restarted
    for method in ("clip", "harmony"):
        summary = report["methods"][method]
        assert summary["status"] == "finished" and summary["steps"] == steps_per_epoch and summary["epochs"] == 1
        assert summary["flops"] > 0 and summary["training_time_s"] > 0 and summary["peak_memory_bytes"] > 0
        assert len(summary["evaluations"]) == 2 and 0 <= summary["final"]["zero-shot top-1"] <= 1
    assert report["methods"]["harmony"]["flops_per_step"] > report["methods"]["clip"]["flops_per_step"]
    table = (tmp_path / "tiny" / "report.md").read_text()
    assert "| clip (clip/demo) | finished |" in table and "| harmony (harmony/demo) | finished |" in table
    for chart in ("metrics_vs_compute.png", "differences.png", "loss_curves.png"):
        assert (tmp_path / "tiny" / chart).stat().st_size > 0

    with pytest.raises(SystemExit, match="other settings or code: clip/seed0: budget: 'epochs:1' -> 'epochs:2'"):
        compare_run.main([*arguments[:5], "epochs:2", *arguments[6:]])


def test_a_failing_trainer_is_reported_with_its_last_words(tmp_path):
    trainers = execute.Trainers()
    try:
        with pytest.raises(execute.MethodFailed, match="exit code 1: config error: config preset 'nosuch'"):
            execute.train_to(trainers, tmp_path / "run", "nosuch", [], epochs=1, step=1)
    finally:
        trainers.restore()


def test_evaluation_sets_are_checked_before_anything_trains(tmp_path):
    (tmp_path / "not_a_set").mkdir()
    with pytest.raises(SystemExit, match="not_a_set.* in none of the evaluation layouts"):
        compare_run.main(["--methods", "clip", "--out", str(tmp_path / "out"), "--zeroshot",
                          str(tmp_path / "not_a_set")])
    assert not (tmp_path / "out").exists()


def test_a_run_whose_evaluation_fails_is_reported_failed_with_the_reason(tmp_path):
    """A trainer that finished its step but left no weights to evaluate: the run fails with the evaluation's error
    (the comparison reports it and goes on with the others)."""
    out_dir = tmp_path / "cmp"
    run = {**plan.new_run("clip", 0, "clip/demo", {}), "steps": 3, "epochs": 1, "eval_steps": [3]}
    (out_dir / run["run_dir"]).mkdir(parents=True)
    write_status(out_dir / run["run_dir"], "finished", 3)
    options = argparse.Namespace(shards="shards/demo/train", mix_weights="", train_args=[], device="cpu")
    trainers = execute.Trainers()
    try:
        with pytest.raises(execute.MethodFailed, match="evaluating step 3: FileNotFoundError: .*teacher_weights"):
            execute.run_one(trainers, out_dir, run, options, EvalData(zeroshot=str(tmp_path)))
    finally:
        trainers.restore()


def test_every_budget_kind_takes_one_number_syntax_and_refuses_what_is_not_finite_and_above_0():
    assert budget.parse("time:1e3").amount == 1000 and budget.parse("time:2.5m").amount == 150
    assert budget.parse("flops:3e14").amount == 3e14 and budget.parse("epochs:1e1") == budget.Budget("epochs", 10)
    assert budget.parse("flops:clip@2.0") == budget.Budget("flops", 0.0, "clip", 2)
    for text, says in (("flops:inf", "FLOPs must be a finite number above 0, not 'inf'"),
                       ("flops:nan", "FLOPs must be a finite number above 0"), ("time:0", "seconds must be a finite"),
                       ("time:-1e3s", "seconds must be a finite"), ("epochs:1.5", "epochs must be a whole number"),
                       ("flops:clip@0", "epochs must be a finite"), ("time:soon", "'soon' is not a number")):
        with pytest.raises(ValueError, match=f"^BUDGET='{text}': {says}"):
            budget.parse(text)


def test_an_unknown_equal_compute_method_is_refused_before_anything_is_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "measure", lambda *args: pytest.fail("measured before the budget was checked"))
    with pytest.raises(SystemExit, match="BUDGET=flops:harmny@2: harmny is not among the comparison's methods "
                                         r"\(clip, harmony\); did you mean harmony\?"):
        compare_run.main(["--methods", "clip harmony", "--budget", "flops:harmny@2", *fake_comparison(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_eval_points_below_1_are_refused_up_front(tmp_path):
    for points in ("0", "-1"):
        with pytest.raises(SystemExit, match=f"^error: EVAL_POINTS={points} \\(--eval-points\\): .* 1 or more$"):
            compare_run.main(["--methods", "clip", *fake_comparison(tmp_path), "--eval-points", points])
    assert not (tmp_path / "out").exists()


def fake_comparison(tmp_path, name="cmp"):
    """main()'s arguments for a comparison on tiny shards and a one-image zero-shot set (nothing trains in the
    tests that use it: they replace the measurement and the training)."""
    shards = write_training_shards(tmp_path / "train", np.zeros((4, 24, 24, 3), dtype=np.uint8), samples_per_shard=4)
    (tmp_path / "zeroshot" / "cat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "zeroshot" / "cat" / "0.jpg").write_bytes(jpeg_bytes())
    return ["--name", name, "--shards", str(shards), "--out", str(tmp_path / "out"), "--zeroshot",
            str(tmp_path / "zeroshot"), "--eval-points", "1", "--device", "cpu"]


MEASURED = {"clip": {"flops_per_step": 1e3, "seconds_per_step": 0.125, "steps_per_epoch": 2, "global_batch": 2},
            "harmony": {"flops_per_step": 4e3, "seconds_per_step": 0.5, "steps_per_epoch": 2, "global_batch": 2}}


@pytest.fixture
def fake_training(monkeypatch):
    """Measurement and training replaced: each method's step is MEASURED's, and running a run writes its
    evaluations, except for the methods listed in the fixture's value, which fail. `trained` lists the runs run."""
    fake = types.SimpleNamespace(failing=[], trained=[])

    def run_one(trainers, out_dir, run, options, evaluations, launch=None):
        fake.trained.append(plan.run_key(run["method"], run["seed"]))
        if run["method"] in fake.failing:
            raise execute.MethodFailed("out of memory")
        for step in run["eval_steps"]:
            path = execute.result_path(out_dir / run["run_dir"], step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "results": {}}))

    monkeypatch.setattr(budget, "measure", lambda config, timed_steps, ranks: MEASURED[Path(config.run.out_dir).name])
    monkeypatch.setattr(execute, "run_one", run_one)
    return fake


def test_a_comparison_with_a_failed_method_exits_non_zero_saying_how_many_finished(tmp_path, fake_training,
                                                                                    capsys):
    fake_training.failing.append("harmony")
    with pytest.raises(SystemExit) as stopped:
        compare_run.main(["--methods", "clip harmony", *fake_comparison(tmp_path)])
    report_md = tmp_path / "out" / "cmp" / "report.md"
    assert stopped.value.code == f"compare: 1 of 2 methods finished, 1 failed (harmony): see {report_md}"
    assert "| harmony (harmony/demo) | failed: out of memory |" in capsys.readouterr().out
    fake_training.failing.clear()
    compare_run.main(["--methods", "clip harmony", *fake_comparison(tmp_path)])  # tried again: both finish
    assert "compare done" in capsys.readouterr().out


def test_a_budget_under_one_step_is_refused_before_training_and_leaves_the_name_free(tmp_path, fake_training,
                                                                                     capsys):
    arguments = ["--methods", "clip harmony", *fake_comparison(tmp_path)]
    with pytest.raises(SystemExit, match=r"^error: BUDGET=flops:2000: 2e\+03 FLOPs is less than one training step "
                                         r"of harmony; the budget must be at least 4e\+03 FLOPs \(one step of "
                                         r"harmony, the costliest method\)$"):
        compare_run.main([*arguments, "--budget", "flops:2e3"])
    assert not (tmp_path / "out" / "cmp" / plan.PLAN_FILE).exists()
    assert not (tmp_path / "out" / "cmp" / "clip").exists()  # nothing trained
    compare_run.main([*arguments, "--budget", "time:1e0"])  # the same name, another budget
    saved = json.loads((tmp_path / "out" / "cmp" / plan.PLAN_FILE).read_text())
    assert (saved["runs"]["clip/seed0"]["steps"], saved["runs"]["harmony/seed0"]["steps"]) == (8, 2)
    assert "compare done" in capsys.readouterr().out


def test_a_second_comparison_of_the_same_name_is_refused_naming_the_folder_and_its_holder(tmp_path, fake_training):
    arguments = ["--methods", "clip", *fake_comparison(tmp_path)]
    folder = tmp_path / "out" / "cmp"
    busy = f"^error: {folder} is in use by make compare \\(make compare: pid {os.getpid()} on .*\\); wait for that"
    with FolderLock(folder, "make compare", "wait"), pytest.raises(SystemExit, match=busy):
        compare_run.main(arguments)  # as another `make compare` of this name holds the folder
    assert not (folder / plan.PLAN_FILE).exists()
    compare_run.main(arguments)  # released: it runs


def test_a_comparison_grows_training_only_its_new_methods_and_seeds(tmp_path, fake_training):
    arguments = fake_comparison(tmp_path)
    compare_run.main(["--methods", "clip", *arguments])
    finished, = (tmp_path / "out" / "cmp" / "clip" / "seed0" / execute.EVALUATIONS).glob("step-*.json")
    written = finished.stat().st_mtime_ns
    compare_run.main(["--methods", "clip harmony", "--seeds", "0 1", *arguments])
    assert fake_training.trained == ["clip/seed0", "clip/seed1", "harmony/seed0", "harmony/seed1"]
    assert finished.stat().st_mtime_ns == written
    compare_run.main(["--methods", "harmony", *arguments])  # a subset: nothing new, every run still reported
    assert len(fake_training.trained) == 4
    reported = json.loads((tmp_path / "out" / "cmp" / "report.json").read_text())
    assert set(reported["methods"]) == {"clip", "harmony"}


def test_a_changed_training_setting_is_refused_naming_it_or_kept_and_marked_when_accepted(tmp_path, fake_training):
    arguments = ["--methods", "clip", *fake_comparison(tmp_path)]
    compare_run.main(arguments)
    with pytest.raises(SystemExit, match=r"clip/seed0: config\.optim\.lr: 0\.004 -> 0\.001\. Run it with"):
        compare_run.main([*arguments, "--train-args", "optim.lr=0.001"])
    compare_run.main([*arguments, "--train-args", "optim.lr=0.001", "--accept-changes"])
    assert fake_training.trained == ["clip/seed0"]  # kept as trained
    saved = json.loads((tmp_path / "out" / "cmp" / plan.PLAN_FILE).read_text())
    assert saved["runs"]["clip/seed0"]["accepted_changes"] == ["config.optim.lr"]
    assert "config.optim.lr" in (tmp_path / "out" / "cmp" / "report.md").read_text()


def test_a_comparison_started_before_seeds_continues_with_its_runs_where_they_are(tmp_path, fake_training):
    """A version-1 plan (one seed, <name>/<method>/ run folders, as make compare wrote before seeds) is read as
    version 2: its finished run is reported from its folder, not trained again; a new seed trains."""
    arguments = ["--methods", "clip", *fake_comparison(tmp_path)]
    out_dir = tmp_path / "out" / "cmp"
    parser_args = compare_run.parse_arguments(arguments)[1]
    compare_run.check_arguments(parser_args)
    run = compare_run.wanted_runs(parser_args, out_dir, {"clip": "clip/demo"},
                                  compare_run.eval_data(*compare_run.parse_arguments(arguments)))["clip/seed0"]
    shared = {key: value for key, value in run["fingerprint"].items() if key not in ("config", "ranks")}
    # written before presets moved to one folder per method: its preset is clip/demo's old name
    version_1 = {"settings": {"methods": {"clip": {"preset": "clip_demo", "config": run["fingerprint"]["config"]}},
                              "seed": 0, "train_args": [], **shared},
                 "methods": {"clip": {"preset": "clip_demo", "measured": MEASURED["clip"], "steps": 2, "epochs": 1,
                                      "eval_steps": [2]}}}
    out_dir.mkdir(parents=True)
    (out_dir / plan.PLAN_FILE).write_text(json.dumps(version_1))
    evaluation = out_dir / "clip" / execute.EVALUATIONS / "step-00000002.json"
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text(json.dumps({"step": 2, "results": {}}))
    compare_run.main(arguments)
    assert fake_training.trained == []
    compare_run.main([*arguments, "--seeds", "0 1"])
    assert fake_training.trained == ["clip/seed1"] and (out_dir / "clip" / "seed1" / execute.EVALUATIONS).is_dir()


def tiny_arguments(demo_shards, out, name, *extra):
    """A comparison of tiny models on the demo shards, one evaluation at the end; of methods with clip/demo's
    objectives (clip, siglip), as the overrides shrink the objectives they name and enable them elsewhere."""
    assert tiny("siglip/demo") == tiny("clip/demo")
    return ["--name", name, "--budget", "epochs:1", "--eval-points", "1", "--shards", str(demo_shards["train"]),
            "--out", str(out), "--zeroshot", str(demo_shards["heldout"]), "--device", "cpu", *extra,
            "--train-args", *tiny("clip/demo")]


def checkpoint_global_batch(run_dir):
    state = torch.load(max((run_dir / "checkpoints").glob("checkpoint-*.pt")), weights_only=True)
    return state["loader"]["global_batch_size"]


@pytest.mark.slow
def test_each_run_trains_on_nproc_ranks_under_torchrun(demo_shards, tmp_path):
    """NPROC=2 on CPU (gloo): each method's run has a world size of 2 (its global batch is 2 x 8), an epoch is
    the job's epoch, and the report is laid out as for one rank."""
    compare_run.main(["--methods", "clip siglip", "--nproc", "2", *tiny_arguments(demo_shards, tmp_path, "ranks")])
    reported = json.loads((tmp_path / "ranks" / "report.json").read_text())
    for method in ("clip", "siglip"):
        run_dir = tmp_path / "ranks" / method / "seed0"
        assert checkpoint_global_batch(run_dir) == 16
        assert reported["methods"][method]["status"] == "finished"
        steps = [json.loads(row)["step"] for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == reported["plan"]["measured"][method][
            "steps_per_epoch"]


def job_task_pids(job_id):
    """The processes of a submitit local job's task (where Slurm would signal a job's steps)."""
    for process in Path("/proc").iterdir():
        try:
            environment = (process / "environ").read_bytes().split(b"\0")
            command = (process / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environment and b"submitit.core._submit" in command:
            yield int(process.name)


@pytest.mark.slow
def test_runs_as_jobs_with_one_preempted_requeued_and_resumed(demo_shards, tmp_path):
    """The Slurm path through submitit's local executor: two methods x two seeds as four jobs at once; one job is
    signalled as Slurm signals a preempted job (USR2), its trainer checkpoints, the job is requeued and resumes
    exactly (every step logged once); the report has every run."""
    out_dir = tmp_path / "jobs"
    preempted = out_dir / "clip" / "seed1"

    def preempt():
        while not (preempted / "metrics.jsonl").is_file():
            time.sleep(0.05)
        job_id = json.loads((out_dir / plan.PLAN_FILE).read_text())["runs"]["clip/seed1"]["job"]["id"]
        for pid in job_task_pids(job_id):
            os.kill(pid, signal.SIGUSR2)

    signaller = threading.Thread(target=preempt, daemon=True)
    signaller.start()
    compare_run.main(["--methods", "clip siglip", "--seeds", "0 1", "--executor", "submitit_local",
                      *tiny_arguments(demo_shards, tmp_path, "jobs")])
    signaller.join(timeout=1)
    job_id = json.loads((out_dir / plan.PLAN_FILE).read_text())["runs"]["clip/seed1"]["job"]["id"]
    job_log = "".join(path.read_text() for path in (out_dir / "jobs").glob(f"{job_id}_0_log.*"))
    assert "Calling checkpoint method" in job_log and "Requeued" in job_log and "resumed from" in job_log
    status = json.loads((preempted / "status.json").read_text())
    assert status["state"] == "finished"
    steps = [json.loads(row)["step"] for row in (preempted / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    reported = json.loads((out_dir / "report.json").read_text())
    assert {method: summary["status"] for method, summary in reported["methods"].items()} == {
        "clip": "finished", "siglip": "finished"}
