"""`make compare` on the tiny demo shards: two methods, a tiny budget. A complete report; a comparison killed in
the middle continues where it stopped without training a finished method again; another budget is refused."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import jpeg_bytes, write_training_shards

from datapipe.folder_lock import FolderLock
from tools.compare import budget, methods, report
from tools.compare import run as compare_run
from tools.eval.run import EvalData
from train.run_folder import write_status


def test_methods_are_found_from_their_presets():
    found = methods.discover("demo")
    assert found["harmony"] == "harmony_demo" and found["clip"] == "clip_demo" and found["siglip"] == "siglip_demo"
    assert "ablation_clip_text" not in found.values()  # not a demo-scale preset
    with pytest.raises(ValueError, match="no preset for nosuch at scale 'demo'"):
        methods.resolve(["nosuch"], "demo")


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


def test_a_plan_continues_with_its_own_settings_and_refuses_others(tmp_path):
    """The settings of a comparison, written at its start, match themselves on the next run; a changed value is
    refused naming it (and nothing else)."""
    settings = {"methods": {"clip": {"preset": "clip_demo", "config": {"data.batch_size": 32, "optim.lr": 0.1}}},
                "budget": "epochs:1", "seed": 0}
    assert compare_run.load_or_start_plan(tmp_path, settings)["settings"] == settings
    assert compare_run.load_or_start_plan(tmp_path, json.loads(json.dumps(settings)))["settings"] == settings
    settings["methods"]["clip"]["config"]["data.batch_size"] = 64
    with pytest.raises(ValueError, match=r"other settings: methods\.clip\.config\.data\.batch_size: 32 -> 64\. Run"):
        compare_run.load_or_start_plan(tmp_path, settings)


def test_a_mixture_of_sets_is_in_the_plan_and_a_changed_set_or_weight_is_refused(tmp_path):
    """`--shards "[a, b]" --mix-weights "[1, 0.5]"`: every set's manifest is fingerprinted, the weights are in the
    methods' configs; another manifest for one of the sets, or other weights, is another comparison."""
    def shards(folder, samples):
        return write_training_shards(folder, np.zeros((samples, 24, 24, 3), dtype=np.uint8), samples_per_shard=4)

    first, second = shards(tmp_path / "a" / "train", 4), shards(tmp_path / "b" / "train", 8)
    out_dir, presets, evaluations = tmp_path / "compare", {"clip": "clip_demo"}, EvalData(zeroshot=str(tmp_path))

    def settings(mix_weights="[1, 0.5]"):  # of main()'s arguments
        arguments = argparse.Namespace(shards=f"[{first}, {second}]", mix_weights=mix_weights, seed=0,
                                       budget="epochs:1", eval_points=1, train_args=["data.batch_size=4"])
        return compare_run.settings(arguments, out_dir, presets, evaluations)

    started = compare_run.load_or_start_plan(out_dir, settings())["settings"]
    assert started["shards"] == [str(first), str(second)]
    assert len(set(started["shards_manifest_sha256"])) == 2
    assert started["methods"]["clip"]["config"]["data.mix_weights"] == [1.0, 0.5]
    assert compare_run.described_shards(started).endswith("weighted [1.0, 0.5]")
    with pytest.raises(ValueError, match=r"data.mix_weights: \[1.0, 0.5\] -> \[1.0, 2.0\]"):
        compare_run.load_or_start_plan(out_dir, settings("[1, 2]"))
    with pytest.raises(ValueError, match=r"3 weight\(s\) for 2 shard set\(s\)"):  # before any plan is written
        settings("[1, 2, 3]")
    shards(second, 6)  # rebuilt with other samples
    with pytest.raises(ValueError, match=r"other settings: shards_manifest_sha256: \['"):
        compare_run.load_or_start_plan(out_dir, settings())


@pytest.mark.slow
def test_compare_reports_continues_after_a_kill_and_refuses_another_budget(demo_shards, tmp_path):
    arguments = ["--name", "tiny", "--methods", "clip harmony", "--budget", "epochs:1", "--eval-points", "2",
                 "--shards", str(demo_shards["train"]), "--out", str(tmp_path), "--zeroshot",
                 str(demo_shards["heldout"]), "--train-args", "data.batch_size=32", "data.num_workers=0",
                 "run.log_every=1"]
    clip, harmony = tmp_path / "tiny" / "clip", tmp_path / "tiny" / "harmony"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "tools.compare.run", *arguments], stdout=log, stderr=log)
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
    steps_per_epoch = report["plan"]["harmony"]["measured"]["steps_per_epoch"]
    logged = [json.loads(row)["step"] for row in (harmony / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps_per_epoch + 1))  # every step once: resumed, not restarted
    for method in ("clip", "harmony"):
        summary = report["methods"][method]
        assert summary["status"] == "finished" and summary["steps"] == steps_per_epoch and summary["epochs"] == 1
        assert summary["flops"] > 0 and summary["training_time_s"] > 0 and summary["peak_memory_bytes"] > 0
        assert len(summary["evaluations"]) == 2 and 0 <= summary["final"]["zero-shot top-1"] <= 1
    assert report["methods"]["harmony"]["flops_per_step"] > report["methods"]["clip"]["flops_per_step"]
    table = (tmp_path / "tiny" / "report.md").read_text()
    assert "| clip (clip_demo) | finished |" in table and "| harmony (harmony_demo) | finished |" in table
    for chart in ("metrics_vs_compute.png", "loss_curves.png"):
        assert (tmp_path / "tiny" / chart).stat().st_size > 0

    with pytest.raises(SystemExit, match="other settings: budget: 'epochs:1' -> 'epochs:2'"):
        compare_run.main([*arguments[:5], "epochs:2", *arguments[6:]])


def test_a_failing_trainer_is_reported_with_its_last_words(tmp_path):
    trainers = compare_run.Trainers()
    try:
        with pytest.raises(compare_run.MethodFailed, match="exit code 1: config error: config preset 'nosuch'"):
            compare_run.train_to(trainers, tmp_path / "run", "nosuch", [], epochs=1, step=1)
    finally:
        trainers.restore()


def test_evaluation_sets_are_checked_before_anything_trains(tmp_path):
    (tmp_path / "not_a_set").mkdir()
    with pytest.raises(SystemExit, match="not_a_set.* in none of the evaluation layouts"):
        compare_run.main(["--methods", "clip", "--out", str(tmp_path / "out"), "--zeroshot",
                          str(tmp_path / "not_a_set")])
    assert not (tmp_path / "out").exists()


def test_a_method_whose_evaluation_fails_is_reported_failed_with_the_reason(tmp_path):
    """A trainer that finished its step but left no weights to evaluate: the method fails with the evaluation's
    error (the comparison's loop reports it and goes on with the others), and the table says why."""
    out_dir, method = tmp_path / "cmp", "clip"
    (out_dir / method).mkdir(parents=True)
    write_status(out_dir / method, "finished", 3)
    entry = {"preset": "clip_demo", "steps": 3, "epochs": 1, "eval_steps": [3],
             "measured": {"steps_per_epoch": 3, "flops_per_step": 1.0, "global_batch": 8}}
    args = argparse.Namespace(shards="shards/demo/train", mix_weights="", seed=0, train_args=[], device="cpu")
    trainers = compare_run.Trainers()
    try:
        with pytest.raises(compare_run.MethodFailed, match="evaluating step 3: FileNotFoundError: .*teacher_weights"):
            compare_run.run_method(trainers, out_dir, method, entry, args, EvalData(zeroshot=str(tmp_path)))
    finally:
        trainers.restore()
    summary = report.method_summary(out_dir / method, entry, [], "evaluating step 3: FileNotFoundError: gone")
    assert summary["status"] == "failed"
    assert "| clip (clip_demo) | failed: evaluating step 3: FileNotFoundError: gone |" in \
        report.markdown("cmp", [], {"clip": summary})


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
    """Measurement and training replaced: each method's step is MEASURED's, and training to a step writes its
    evaluation, except for the methods listed in the fixture's value, which fail."""
    failing = []

    def run_method(trainers, out_dir, method, entry, args, evaluations):
        if method in failing:
            raise compare_run.MethodFailed("out of memory")
        for step in entry["eval_steps"]:
            path = out_dir / method / compare_run.EVALUATIONS / f"step-{step:08d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "results": {}}))

    monkeypatch.setattr(budget, "measure", lambda config, timed_steps: MEASURED[config.run.name])
    monkeypatch.setattr(compare_run, "run_method", run_method)
    return failing


def test_a_comparison_with_a_failed_method_exits_non_zero_saying_how_many_finished(tmp_path, fake_training,
                                                                                    capsys):
    fake_training.append("harmony")
    with pytest.raises(SystemExit) as stopped:
        compare_run.main(["--methods", "clip harmony", *fake_comparison(tmp_path)])
    report_md = tmp_path / "out" / "cmp" / "report.md"
    assert stopped.value.code == f"compare: 1 of 2 methods finished, 1 failed (harmony): see {report_md}"
    assert "| harmony (harmony_demo) | failed: out of memory |" in capsys.readouterr().out
    fake_training.clear()
    compare_run.main(["--methods", "clip harmony", *fake_comparison(tmp_path)])  # tried again: both finish
    assert "compare done" in capsys.readouterr().out


def test_a_budget_under_one_step_is_refused_before_training_and_leaves_the_name_free(tmp_path, fake_training,
                                                                                     capsys):
    arguments = ["--methods", "clip harmony", *fake_comparison(tmp_path)]
    with pytest.raises(SystemExit, match=r"^error: BUDGET=flops:2000: 2e\+03 FLOPs is less than one training step "
                                         r"of harmony; the budget must be at least 4e\+03 FLOPs \(one step of "
                                         r"harmony, the costliest method\)$"):
        compare_run.main([*arguments, "--budget", "flops:2e3"])
    assert not (tmp_path / "out" / "cmp" / compare_run.PLAN_FILE).exists()
    assert not (tmp_path / "out" / "cmp" / "clip").exists()  # nothing trained
    compare_run.main([*arguments, "--budget", "time:1e0"])  # the same name, another budget
    plan = json.loads((tmp_path / "out" / "cmp" / compare_run.PLAN_FILE).read_text())
    assert (plan["methods"]["clip"]["steps"], plan["methods"]["harmony"]["steps"]) == (8, 2)
    assert "compare done" in capsys.readouterr().out


def test_a_second_comparison_of_the_same_name_is_refused_naming_the_folder_and_its_holder(tmp_path, fake_training):
    arguments = ["--methods", "clip", *fake_comparison(tmp_path)]
    folder = tmp_path / "out" / "cmp"
    busy = f"^error: {folder} is in use by make compare \\(make compare: pid {os.getpid()} on .*\\); wait for that"
    with FolderLock(folder, "make compare", "wait"), pytest.raises(SystemExit, match=busy):
        compare_run.main(arguments)  # as another `make compare` of this name holds the folder
    assert not (folder / compare_run.PLAN_FILE).exists()
    compare_run.main(arguments)  # released: it runs
