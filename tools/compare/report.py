"""A comparison's report from its run folders: report.json, report.md (the table, also printed) and charts
(metrics_vs_compute.png: each evaluation against training FLOPs, one point per evaluated checkpoint;
loss_curves.png: the total and the CLIP loss against training FLOPs)."""

import json
from pathlib import Path

import matplotlib

from train.log import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LOSS_CURVES = ("loss", "clip_hard")


def headline(results):
    """{metric: value} of one evaluation's results, the figures papers report (same keys for every method)."""
    metrics = {}
    if "zeroshot" in results:
        metrics["zero-shot top-1"] = results["zeroshot"]["top1"]
    if "retrieval" in results:
        metrics["image→text R@1"] = results["retrieval"]["image_to_text_R@1"]
        metrics["text→image R@1"] = results["retrieval"]["text_to_image_R@1"]
        metrics["retrieval mean recall"] = results["retrieval"]["mean_recall"]
    if "linear_probe" in results:
        metrics["linear probe top-1"] = results["linear_probe"]["linear"]["top1"]
        knn = results["linear_probe"]["knn_top1"]
        if knn:
            k = "20" if "20" in knn else next(iter(knn))
            metrics[f"k-NN top-1 (k={k})"] = knn[k]
    return metrics


def training_time_s(rows, global_batch):
    """Seconds the trainer spent in its steps, from metrics.jsonl (each row's steps at its images/s)."""
    seconds, previous = 0.0, 0
    for row in rows:
        if row.get("images_per_s"):
            seconds += (row["step"] - previous) * global_batch / row["images_per_s"]
        previous = row["step"]
    return seconds


def peak_memory(rows, evaluations):
    """(bytes, what they measure) of a method's peak memory: the GPU's peak allocation from metrics.jsonl, else
    the trainer processes' peak resident memory as the comparison watched it (VmHWM; the trainer's own
    peak_rss_bytes would start from the comparison process's peak, which launched it)."""
    on_gpu = [row["peak_memory_bytes"] for row in rows if "peak_memory_bytes" in row]
    if on_gpu:
        return max(on_gpu), "GPU allocated"
    resident = [entry["trainer_peak_rss_bytes"] for entry in evaluations if entry.get("trainer_peak_rss_bytes")]
    return (max(resident), "trainer process RSS") if resident else (None, None)


def method_summary(run_dir, plan_entry, evaluations, failure):
    """One method's figures: steps, epochs, FLOPs, time, peak memory, and its evaluations along the way."""
    rows = [row for row in read_metrics(run_dir) if "loss" in row]
    measured = plan_entry.get("measured", {})
    steps_done = rows[-1]["step"] if rows else 0
    flops_per_step = measured.get("flops_per_step")
    peak_bytes, peak_kind = peak_memory(rows, evaluations)
    done = bool(evaluations) and evaluations[-1]["step"] == plan_entry.get("steps")
    return {"preset": plan_entry["preset"], "run_dir": str(run_dir),
            "status": "failed" if failure else "finished" if done else "not finished",
            "error": failure, "planned_steps": plan_entry.get("steps"), "steps": steps_done,
            "epochs": round(steps_done / measured["steps_per_epoch"], 3) if measured else None,
            "schedule_epochs": plan_entry.get("epochs"), "flops_per_step": flops_per_step,
            "flops": flops_per_step * steps_done if flops_per_step else None,
            "training_time_s": round(training_time_s(rows, measured.get("global_batch", 0)), 1),
            "peak_memory_bytes": peak_bytes, "peak_memory_of": peak_kind,
            "evaluations": [{"step": entry["step"], "flops": flops_per_step * entry["step"] if flops_per_step else None,
                             "metrics": headline(entry["results"])} for entry in evaluations],
            "final": headline(evaluations[-1]["results"]) if done else {}}


def _number(value, unit="", scale=1.0, digits=1):
    return "–" if value is None else f"{value / scale:.{digits}f}{unit}"


def markdown(name, header, methods):
    metrics = list(dict.fromkeys(metric for summary in methods.values() for metric in summary["final"]))
    lines = [f"# Comparison {name}", "", *header, "",
             "| method | status | steps | epochs | training FLOPs | training time | peak memory | "
             + " | ".join(metrics) + " |", "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(metrics)]
    for method, summary in methods.items():
        status = summary["status"] if not summary["error"] else f"failed: {summary['error'][:80]}"
        lines.append(f"| {method} ({summary['preset']}) | {status} | {summary['steps']} | "
                     f"{_number(summary['epochs'], digits=2)} | {_number(summary['flops'], ' T', 1e12, 2)} | "
                     f"{_number(summary['training_time_s'], ' s', digits=0)} | "
                     f"{_number(summary['peak_memory_bytes'], ' GiB', 2 ** 30, 2)} | "
                     + " | ".join(_number(summary["final"].get(metric), "%", 0.01) for metric in metrics) + " |")
    return "\n".join(lines) + "\n"


def _save(figure, axes, path):
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def charts(methods, run_dirs, out_dir):
    """metrics_vs_compute.png and loss_curves.png; returns the paths written."""
    written = []
    metrics = list(dict.fromkeys(metric for summary in methods.values() for entry in summary["evaluations"]
                                 for metric in entry["metrics"]))
    if metrics:
        figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
        for axis, metric in zip(axes.flat, metrics, strict=True):
            for method, summary in methods.items():
                points = [(entry["flops"], 100 * entry["metrics"][metric]) for entry in summary["evaluations"]
                          if entry["flops"] is not None and metric in entry["metrics"]]
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", linewidth=1.2, label=method)
            axis.set_title(metric, fontsize=9)
            axis.set_xlabel("training FLOPs", fontsize=8)
            axis.set_ylabel("%", fontsize=8)
        written.append(_save(figure, axes, out_dir / "metrics_vs_compute.png"))
    figure, axes = plt.subplots(1, len(LOSS_CURVES), figsize=(4.2 * len(LOSS_CURVES), 3.0), squeeze=False)
    for axis, loss in zip(axes.flat, LOSS_CURVES, strict=True):
        for method, summary in methods.items():
            rows = [row for row in read_metrics(run_dirs[method]) if loss in row]
            if rows and summary["flops_per_step"]:
                axis.plot([row["step"] * summary["flops_per_step"] for row in rows], [row[loss] for row in rows],
                          linewidth=1.0, label=method)
        axis.set_title(f"{loss} (training)", fontsize=9)
        axis.set_xlabel("training FLOPs", fontsize=8)
    written.append(_save(figure, axes, out_dir / "loss_curves.png"))
    return written


def write(out_dir, name, header, summary, methods):
    """report.json, report.md and the charts; returns the table."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps({**summary, "methods": methods}, indent=2))
    table = markdown(name, header, methods)
    (out_dir / "report.md").write_text(table)
    charts(methods, {method: Path(entry["run_dir"]) for method, entry in methods.items()}, out_dir)
    return table
