"""make compare's report over seeds from hand-written run folders (metrics.jsonl and compare_evals JSON): three
methods x two seeds, one of which failed; the table's mean ± std, reference row, failed row and intervals, the
charts' complete legends, and the per-example outcomes the evaluations record."""

import json

import numpy as np
import pytest
import torch

from comparison import metrics, report
from evaluation import linear_probe
from evaluation.retrieval import RECALL_AT, first_right_rank

EXAMPLES, CLASSES, CAPTIONS_PER_IMAGE = 400, 10, 2
STEPS, EVAL_STEPS = 40, (20, 40)
MEASURED = {"flops_per_step": 1e12, "seconds_per_step": 0.1, "steps_per_epoch": 10, "global_batch": 32}


def fake_results(rng, accuracy):
    """evaluation.run.evaluate's dict with per-example outcomes drawn at `accuracy`."""
    correct = (rng.random(EXAMPLES) < accuracy).astype(int)
    image_rank = np.where(rng.random(EXAMPLES) < accuracy, 0, rng.integers(1, 30, EXAMPLES))
    caption_rank = np.where(rng.random(EXAMPLES * CAPTIONS_PER_IMAGE) < accuracy, 0,
                            rng.integers(1, 30, EXAMPLES * CAPTIONS_PER_IMAGE))
    recalls = {f"{name}_R@{k}": round(float((rank < k).mean()), 4) for name, rank in
               (("image_to_text", image_rank), ("text_to_image", caption_rank)) for k in RECALL_AT}
    return {"zeroshot": {"top1": round(float(correct.mean()), 4), "chance": 1 / CLASSES, "classes": CLASSES,
                         "per_example_correct": correct.tolist()},
            "retrieval": {**recalls, **{f"chance_R@{k}": k / EXAMPLES for k in RECALL_AT},
                          "mean_recall": round(float(np.mean(list(recalls.values()))), 4),
                          "per_query_rank": {"image_to_text": image_rank.tolist(),
                                             "text_to_image": caption_rank.tolist()},
                          "captions_per_image": [CAPTIONS_PER_IMAGE] * EXAMPLES},
            "linear_probe": {"linear": {"top1": round(float(correct.mean()), 4),
                                        "per_example_correct": correct.tolist()},
                             "knn_top1": {"10": 0.5, "20": round(float(correct.mean()), 4)},
                             "knn_per_example_correct": {"20": correct.tolist()}, "chance": 1 / CLASSES}}


def fake_run(run_dir, rng, accuracy, shared_loss=True, failure=None, changed=()):
    """A run folder (metrics.jsonl, compare_evals) and its write_comparison entry; a failed run stops at step 5."""
    run_dir.mkdir(parents=True)
    last = 5 if failure else STEPS
    rows = [{"step": step, "loss": 9.0 - step / 10,
             **({"clip_hard": 5.0 - 3 * accuracy * step / STEPS + rng.normal(0, 0.05)} if shared_loss else {}),
             "images_per_s": 320.0, "peak_memory_bytes": 2 ** 30} for step in range(1, last + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluations = [{"step": step, "trainer_peak_rss_bytes": None,
                    "results": fake_results(rng, accuracy * step / STEPS)} for step in EVAL_STEPS if step <= last]
    for evaluation in evaluations:
        path = run_dir / "compare_evals" / f"step-{evaluation['step']:08d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(evaluation))
    entry = {"preset": f"{run_dir.parent.name}/demo", "measured": MEASURED, "steps": STEPS, "epochs": 4,
             "eval_steps": list(EVAL_STEPS)}
    return {"run_dir": run_dir, "entry": entry, "evaluations": evaluations, "failure": failure,
            "changed": list(changed)}


@pytest.fixture
def comparison(tmp_path):
    """clip (reference) and harmony (better, one seed trained before an accepted change) finish two seeds each;
    siglip's seed 1 fails, and siglip logs no clip_hard."""
    rng = np.random.default_rng(0)
    runs = {"clip": {seed: fake_run(tmp_path / "clip" / f"seed{seed}", rng, 0.5) for seed in (0, 1)},
            "harmony": {0: fake_run(tmp_path / "harmony" / "seed0", rng, 0.8),
                        1: fake_run(tmp_path / "harmony" / "seed1", rng, 0.8, changed=["config.optim.lr"])},
            "siglip": {0: fake_run(tmp_path / "siglip" / "seed0", rng, 0.5, shared_loss=False),
                       1: fake_run(tmp_path / "siglip" / "seed1", rng, 0.5, shared_loss=False,
                                   failure="out of memory")}}
    return tmp_path / "report", runs


def test_the_table_has_mean_and_std_the_reference_the_failed_method_and_intervals(comparison):
    out_dir, runs = comparison
    out_dir.mkdir()
    table, summaries = report.write_comparison(out_dir, "seeds", ["Budget: test."], {"runs": {}}, runs, "clip")
    assert {method: summary["status"] for method, summary in summaries.items()} == \
        {"clip": "finished", "harmony": "finished", "siglip": "failed"}
    assert set(summaries["clip"]["seeds"]) == {0, 1}
    clip_top1 = summaries["clip"]["metrics"]["zero-shot top-1"]
    values = list(clip_top1["values"].values())
    assert clip_top1["mean"] == pytest.approx(np.mean(values)) and clip_top1["std"] == pytest.approx(
        np.std(values, ddof=1))
    clip_row = next(line for line in table.splitlines() if line.startswith("| clip (clip/demo) | finished | 2 |"))
    assert f"{100 * clip_top1['mean']:.1f} ± {100 * clip_top1['std']:.1f}%" in clip_row
    assert clip_row.endswith("| reference |")
    harmony_row = next(line for line in table.splitlines() if line.startswith("| harmony (harmony/demo) † |"))
    assert harmony_row.endswith(", distinguishable |")  # 80% vs 50% on 400 examples
    assert "| siglip (siglip/demo) | failed: seed 1: out of memory | 2 |" in table
    assert "(1 of 2 seeds)" in table  # siglip's metrics come from its one evaluated seed
    assert "† harmony seed 1 was trained before accepted changes of: config.optim.lr." in table
    assert "Intervals: a paired bootstrap" in table
    difference = summaries["harmony"]["differences"]["zero-shot top-1"]
    assert difference["low"] > 0 and difference["noise"] == "examples and seeds"
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["methods"]["harmony"]["differences"]["zero-shot top-1"]["distinguishable"] is True
    assert set(saved["methods"]["siglip"]["seeds"]) == {"0", "1"}
    written = (out_dir / "report.md").read_text()
    assert written.startswith(table) and "![each metric against training FLOPs" in written


def test_a_published_report_is_the_one_the_command_wrote(comparison, tmp_path):
    out_dir, runs = comparison
    out_dir.mkdir()
    published = tmp_path / "docs" / "compare" / "seeds"
    published.mkdir(parents=True)
    (published / "loss_curves.png").write_bytes(b"a chart of an earlier report")
    runs.pop("clip")  # no reference: no differences chart; harmony's shared loss only
    report.write_comparison(out_dir, "seeds", [], {}, runs, "clip", publish_dir=published)
    charts = sorted(path.name for path in out_dir.glob("*.png"))
    assert sorted(path.name for path in published.iterdir()) == sorted(["report.md", *charts])
    for name in ["report.md", *charts]:
        assert (published / name).read_bytes() == (out_dir / name).read_bytes()
    assert all(f"]({chart})" in (published / "report.md").read_text() for chart in charts)


def test_every_chart_names_every_method_it_draws(comparison):
    out_dir, runs = comparison
    out_dir.mkdir()
    summaries = {method: report.method_over_seeds(seed_runs) for method, seed_runs in runs.items()}
    differences = report.reference_differences(runs, summaries, "clip")
    labels = report.comparison_charts(runs, summaries, "clip", differences, out_dir)
    assert labels["metrics_vs_compute.png"] == ["clip (reference)", "harmony", "siglip: failed"]
    assert labels["differences.png"] == ["harmony", "siglip: failed"]
    assert labels["loss_curves.png"] == ["clip (reference)", "harmony"]  # siglip logs no clip_hard
    assert all((out_dir / name).stat().st_size > 0 for name in labels)


def test_twenty_methods_have_twenty_different_styles():
    styles = report.method_styles([f"method{index}" for index in range(20)])
    assert len(set(styles.values())) == 20
    assert len({colour for colour, _ in styles.values()}) == 20


def test_without_the_reference_the_report_says_so_and_has_no_intervals(comparison):
    out_dir, runs = comparison
    out_dir.mkdir()
    del runs["clip"]
    table, summaries = report.write_comparison(out_dir, "seeds", [], {}, runs, "clip")
    assert "No intervals: the reference method clip is not in this comparison" in table
    assert "Δ" not in table and all(not summary["differences"] for summary in summaries.values())
    assert not (out_dir / "differences.png").exists()


def test_one_seed_says_the_intervals_cover_example_noise_only(comparison):
    out_dir, runs = comparison
    out_dir.mkdir()
    runs = {method: {0: seed_runs[0]} for method, seed_runs in runs.items()}
    table, summaries = report.write_comparison(out_dir, "one", [], {}, runs, "clip")
    assert "(1 seed)" in table and "the intervals cover example noise only" in table
    assert summaries["harmony"]["differences"]["zero-shot top-1"]["noise"] == "examples only"
    assert summaries["siglip"]["status"] == "finished"


def test_per_example_outcomes_give_the_headline_values():
    results = fake_results(np.random.default_rng(1), 0.6)
    headline = metrics.headline(results)
    for metric, (sums, counts) in metrics.per_example_outcomes(results).items():
        value = (sums.sum(axis=-1) / counts.sum(axis=-1)).mean()
        assert value == pytest.approx(headline[metric], abs=1e-4), metric


def test_the_evaluations_per_example_outcomes_match_their_summaries():
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.5, 0.6], [0.1, 0.9, 0.3]])
    assert first_right_rank(similarity, torch.eye(3, dtype=torch.bool)).tolist() == [0, 2, 1]
    generator = torch.Generator().manual_seed(0)
    train, labels = torch.randn(60, 4, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    test, test_labels = torch.randn(25, 4, generator=generator), torch.randint(0, 3, (25,), generator=generator)
    hits = linear_probe.knn_correct(train, labels, test, test_labels, classes=3, ks=(10, 20))
    knn = linear_probe.knn_results(hits)
    assert knn["knn_top1"] == linear_probe.knn(train, labels, test, test_labels, classes=3, ks=(10, 20))
    assert np.mean(knn["knn_per_example_correct"]["20"]) == pytest.approx(knn["knn_top1"]["20"], abs=1e-4)
    probe = linear_probe.linear_probe(train, labels, test, test_labels, classes=3, epochs=2)
    assert set(probe["per_example_correct"]) <= {0, 1} and len(probe["per_example_correct"]) == 25
    assert np.mean(probe["per_example_correct"]) == pytest.approx(probe["top1"], abs=1e-4)
