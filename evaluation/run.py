"""`make eval RUN=...`: every evaluation whose data is given, one JSON, one table and one chart.

    python -m evaluation.run --run runs/harmony_demo --zeroshot shards/demo/source/heldout \
        --retrieval shards/demo/source/heldout_pairs --probe-train shards/demo/source/probe_train \
        --probe-test shards/demo/source/heldout

Writes <run>/eval.json (every result, with each evaluation's per-example outcomes for paired comparisons),
<run>/eval.md (the table, also printed) and <run>/plots/eval.png.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

from datapipe.common.object_store import is_remote
from evaluation.datasets import LayoutError, open_eval_set
from evaluation.linear_probe import probe
from evaluation.retrieval import RECALL_AT, retrieval
from evaluation.towers import RunTowers, undecodable_note
from evaluation.zeroshot import zero_shot

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What `make eval` evaluates: each set in any layout evaluation.datasets reads; None skips it."""
    zeroshot: str | None = None
    zeroshot_labels: str | None = None  # a flat ImageNet folder's label file
    templates: str | None = None  # openai | simple | a file; None: the set's own or its default
    retrieval: str | None = None
    retrieval_images: str | None = None  # a Karpathy JSON's image folder
    probe_train: str | None = None
    probe_train_labels: str | None = None
    probe_test: str | None = None
    probe_test_labels: str | None = None
    probe_epochs: int = 100


def evaluate(run_dir, data, device="auto"):
    """Every evaluation `data` (an EvalData) gives, on `device` (evaluation.towers.eval_device). The towers load
    once; a set read by two evaluations (by default the held-out split, for zero-shot and as the probe's test
    set) is encoded once."""
    towers, results = RunTowers(run_dir, device), {}
    if data.zeroshot:
        results["zeroshot"] = zero_shot(towers, data.zeroshot, data.templates, data.zeroshot_labels)
    if data.retrieval:
        results["retrieval"] = retrieval(towers, data.retrieval, data.retrieval_images)
    if data.probe_train and data.probe_test:
        results["linear_probe"] = probe(towers, data.probe_train, data.probe_test, data.probe_epochs,
                                        data.probe_train_labels, data.probe_test_labels)
    return results


def table_rows(results):
    """(evaluation, metric, value %, chance %) rows."""
    rows = []
    if "zeroshot" in results:
        result = results["zeroshot"]
        rows.append(("zero-shot", f"top-1, {result['classes']} classes", result["top1"], result["chance"]))
    if "retrieval" in results:
        result = results["retrieval"]
        for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            rows += [("retrieval", f"{label} R@{k}, {result['images']} images", result[f"{direction}_R@{k}"],
                      result[f"chance_R@{k}"]) for k in RECALL_AT]
    if "linear_probe" in results:
        result = results["linear_probe"]
        rows.append(("linear probe", f"top-1 (lr {result['linear']['chosen_lr']})", result["linear"]["top1"],
                     result["chance"]))
        rows += [("k-NN", f"top-1, k={k}", top1, result["chance"]) for k, top1 in result["knn_top1"].items()]
    return rows


def undecodable_notes(results):
    """One line per evaluation set of `results` with images that do not decode (left out of its evaluations)."""
    entries = {entry["source"]: entry for result in results.values() for entry in result.get("undecodable", [])}
    return [undecodable_note(entry) for entry in entries.values()]


def markdown_table(run_dir, rows, notes=()):
    lines = [f"# Evaluation of {run_dir}", "", "| evaluation | metric | result | chance |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {metric} | {100 * value:.1f}% | {100 * chance:.1f}% |"
              for name, metric, value, chance in rows]
    lines += ["", *(f"Note: {note}." for note in notes)] if notes else []
    return "\n".join(lines) + "\n"


def plot(rows, path):
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    labels = [f"{name}: {metric}" for name, metric, _, _ in rows]
    axis.barh(labels, [100 * value for _, _, value, _ in rows], color="#6a9fd4", label="result")
    axis.scatter([100 * chance for *_, chance in rows], labels, color="#b04040", marker="|", s=200, label="chance")
    axis.invert_yaxis()
    axis.set_xlabel("%")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def add_eval_arguments(parser):
    """The options that say what to evaluate (`make eval`'s and `make compare`'s)."""
    parser.add_argument("--zeroshot", help="classification set for zero-shot (any layout of evaluation.datasets)")
    parser.add_argument("--zeroshot-labels", help="label file of a flat ImageNet folder given to --zeroshot")
    parser.add_argument("--templates", help="zero-shot templates: openai | simple | a file ({c} = the class name)")
    parser.add_argument("--retrieval", help="retrieval set: held-out shards, CLIP_benchmark folder or Karpathy JSON")
    parser.add_argument("--retrieval-images", help="image folder of a Karpathy JSON given to --retrieval")
    parser.add_argument("--probe-train", help="training classification set for the linear probe and k-NN")
    parser.add_argument("--probe-train-labels", help="label file of a flat ImageNet folder given to --probe-train")
    parser.add_argument("--probe-test", help="test classification set for the linear probe and k-NN")
    parser.add_argument("--probe-test-labels", help="label file of a flat ImageNet folder given to --probe-test")
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--device", default="auto", help="auto (a CUDA device when there is one) | cpu | cuda[:N]")


def eval_data(parser, args):
    """The EvalData of parsed `add_eval_arguments` options; a usage error when they give nothing to evaluate."""
    if bool(args.probe_train) != bool(args.probe_test):
        parser.error("the linear probe needs both --probe-train and --probe-test")
    if not (args.zeroshot or args.retrieval or args.probe_train):
        parser.error("nothing to evaluate: give --zeroshot, --retrieval, or --probe-train with --probe-test")
    return EvalData(**{field.name: getattr(args, field.name) for field in dataclasses.fields(EvalData)})


def check_eval_data(data):
    """Open every local set `data` (an EvalData) names, so that a wrong path or layout stops a long job (make
    compare) before it trains anything; sets in object storage are read when evaluated."""
    wanted = ((data.zeroshot, data.zeroshot_labels, None, "classification", "--zeroshot"),
              (data.retrieval, None, data.retrieval_images, "retrieval", "--retrieval"),
              (data.probe_train, data.probe_train_labels, None, "classification", "--probe-train"),
              (data.probe_test, data.probe_test_labels, None, "classification", "--probe-test"))
    for source, labels, images, kind, option in wanted:
        if source and not is_remote(source):
            eval_set = open_eval_set(source, labels, images)
            if eval_set.kind != kind:
                raise LayoutError(f"{option} {source}: a {eval_set.layout} set is for {eval_set.kind}, not {kind}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.run, eval_data(parser, args), args.device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    run_dir = Path(args.run)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    rows = table_rows(results)
    table = markdown_table(args.run, rows, undecodable_notes(results))
    (run_dir / "eval.md").write_text(table)
    plot(rows, run_dir / "plots" / "eval.png")
    print(table)
    print(f"eval done: {', '.join(results)} written to {run_dir / 'eval.json'}, eval.md and plots/eval.png")


if __name__ == "__main__":
    main()
