"""A comparison's report from its runs (each method trained with one or more seeds): report.json, report.md (the
table, also printed) and charts:
- metrics_vs_compute.png: each headline metric against training FLOPs, mean ± std over seeds at each evaluation;
- differences.png: each method's difference to the reference on the main metric at the last evaluation, with its
  95% interval (comparison.statistics: a paired bootstrap over the evaluation examples and the seeds);
- loss_curves.png: the InfoNCE term every softmax-CLIP method logs (clip_hard), one line per method: the one loss
  term the methods share (their totals add different objectives and are not comparable).
"""

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np

from comparison import statistics
from comparison.metrics import chance_levels, headline, main_metric, per_example_outcomes
from train.log import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

SHARED_LOSS = "clip_hard"  # the InfoNCE term of every softmax-CLIP objective (model.losses.clip_loss)
FIGURE_WIDTH_IN, DPI = 8.2, 110  # about 900 px: the README's width
MARKERS = "os^Dv<>"  # 7 markers x 10 colours: 70 distinct styles, and neighbours never share either
CHANGED_MARK = "†"
SAME_FLOPS_TOLERANCE = 0.01


def training_time_s(rows, global_batch):
    """Seconds the trainer spent in its steps, from metrics.jsonl (each row's steps at its images/s)."""
    seconds, previous = 0.0, 0
    for row in rows:
        if row.get("images_per_s"):
            seconds += (row["step"] - previous) * global_batch / row["images_per_s"]
        previous = row["step"]
    return seconds


def peak_memory(rows, evaluations):
    """(bytes, what they measure) of a run's peak memory: the GPU's peak allocation from metrics.jsonl, else
    the trainer processes' peak resident memory as the comparison watched it (VmHWM; the trainer's own
    peak_rss_bytes would start from the comparison process's peak, which launched it)."""
    on_gpu = [row["peak_memory_bytes"] for row in rows if "peak_memory_bytes" in row]
    if on_gpu:
        return max(on_gpu), "GPU allocated"
    resident = [entry["trainer_peak_rss_bytes"] for entry in evaluations if entry.get("trainer_peak_rss_bytes")]
    return (max(resident), "trainer process RSS") if resident else (None, None)


def method_summary(run_dir, plan_entry, evaluations, failure):
    """One run's figures: steps, epochs, FLOPs, time, peak memory, and its evaluations along the way."""
    rows = [row for row in read_metrics(run_dir) if "loss" in row]
    measured = plan_entry.get("measured") or {}
    steps_done = rows[-1]["step"] if rows else 0
    flops_per_step = measured.get("flops_per_step")
    peak_bytes, peak_kind = peak_memory(rows, evaluations)
    done = bool(evaluations) and evaluations[-1]["step"] == plan_entry.get("steps")
    return {"preset": plan_entry.get("preset"), "run_dir": str(run_dir),
            "status": "failed" if failure else "finished" if done else "not finished",
            "error": failure, "planned_steps": plan_entry.get("steps"), "steps": steps_done,
            "epochs": round(steps_done / measured["steps_per_epoch"], 3) if measured.get("steps_per_epoch") else None,
            "schedule_epochs": plan_entry.get("epochs"), "flops_per_step": flops_per_step,
            "flops": flops_per_step * steps_done if flops_per_step else None,
            "training_time_s": round(training_time_s(rows, measured.get("global_batch", 0)), 1),
            "peak_memory_bytes": peak_bytes, "peak_memory_of": peak_kind,
            "evaluations": [{"step": entry["step"], "flops": flops_per_step * entry["step"] if flops_per_step else None,
                             "metrics": headline(entry["results"])} for entry in evaluations],
            "final": headline(evaluations[-1]["results"]) if done else {}}


# One method over its seeds.

def method_over_seeds(seed_runs):
    """A method's summary from {seed: run} (write_comparison's runs[method]): status, error, the seed means of
    the training figures, each headline metric at the last step every evaluated seed reached (mean, std and
    per-seed values), the evaluations along the way (mean and std per step) and each seed's method_summary."""
    seeds = {seed: {**method_summary(run["run_dir"], run["entry"], run["evaluations"], run["failure"]),
                    "changed": list(run.get("changed") or [])} for seed, run in sorted(seed_runs.items())}
    final_step = common_final_step(seed_runs)
    metrics = final_metrics(seed_runs, final_step)
    status = combined_status(seeds)
    first = next(iter(seeds.values()))
    return {"preset": first["preset"], "status": status, "error": first_error(seeds),
            "planned_steps": first["planned_steps"], "final_step": final_step,
            **{key: mean_of(summary[key] for summary in seeds.values())
               for key in ("steps", "epochs", "flops_per_step", "flops", "training_time_s", "peak_memory_bytes")},
            "peak_memory_of": first["peak_memory_of"], "metrics": metrics,
            "final": {metric: spread["mean"] for metric, spread in metrics.items()} if status == "finished" else {},
            "evaluations": evaluation_curve(seeds.values()), "differences": {},
            "changed": {seed: summary["changed"] for seed, summary in seeds.items() if summary["changed"]},
            "seeds": seeds}


def combined_status(seeds):
    """finished when every seed finished; failed when any failed; else not finished."""
    statuses = [summary["status"] for summary in seeds.values()]
    if all(status == "finished" for status in statuses):
        return "finished"
    return "failed" if "failed" in statuses else "not finished"


def first_error(seeds):
    """The first failed seed's error, naming the seed when the method has several; None without one."""
    failed = [(seed, summary["error"]) for seed, summary in seeds.items() if summary["error"]]
    if not failed:
        return None
    seed, error = failed[0]
    return error if len(seeds) == 1 else f"seed {seed}: {error}"


def mean_of(values):
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


def common_final_step(seed_runs):
    """The last step that every seed with evaluations evaluated (None when no seed was evaluated)."""
    evaluated = [{entry["step"] for entry in run["evaluations"]} for run in seed_runs.values() if run["evaluations"]]
    common = set.intersection(*evaluated) if evaluated else set()
    return max(common, default=None)


def results_at(seed_runs, step):
    """{seed: evaluation results at `step`} of the seeds evaluated there."""
    return {seed: entry["results"] for seed, run in sorted(seed_runs.items()) for entry in run["evaluations"]
            if entry["step"] == step}


def final_metrics(seed_runs, step):
    """{metric: statistics.spread of its per-seed values, with "values": {seed: value}} at `step`."""
    values = {}
    for seed, results in results_at(seed_runs, step).items():
        for metric, value in headline(results).items():
            values.setdefault(metric, {})[seed] = value
    return {metric: {**statistics.spread(list(per_seed.values())), "values": per_seed}
            for metric, per_seed in values.items()}


def evaluation_curve(seed_summaries):
    """[{step, flops, metrics: {metric: spread}}] over the seeds evaluated at each step, by step."""
    by_step = {}
    for summary in seed_summaries:
        for entry in summary["evaluations"]:
            by_step.setdefault(entry["step"], []).append(entry)
    curve = []
    for step, entries in sorted(by_step.items()):
        metrics = dict.fromkeys(metric for entry in entries for metric in entry["metrics"])
        curve.append({"step": step, "flops": mean_of(entry["flops"] for entry in entries),
                      "metrics": {metric: statistics.spread([entry["metrics"][metric] for entry in entries
                                                             if metric in entry["metrics"]]) for metric in metrics}})
    return curve


# Differences to the reference.

def method_outcomes(seed_runs, step, metric):
    """statistics.Outcomes of `metric` over the seeds evaluated at `step`, or why there are none."""
    per_seed = [per_example_outcomes(results).get(metric) for results in results_at(seed_runs, step).values()]
    if not per_seed:
        return "no evaluation"
    if any(outcomes is None for outcomes in per_seed):
        return "no per-example outcomes (evaluated before they were recorded: evaluate again)"
    if any(counts.shape != per_seed[0][1].shape for _, counts in per_seed):
        return "its seeds were evaluated on different numbers of examples"
    return statistics.Outcomes(np.stack([sums for sums, _ in per_seed]), per_seed[0][1])


def reference_differences(runs, summaries, reference):
    """{metric: {method: statistics.paired_differences' interval, or {"not_paired": why}}} of every metric the
    reference has at its last evaluation, each method at its own last evaluation."""
    if reference not in runs:
        return {}
    differences = {}
    for metric in summaries[reference]["metrics"]:
        outcomes = {method: method_outcomes(runs[method], summaries[method]["final_step"], metric)
                    for method in runs}
        if not isinstance(outcomes[reference], statistics.Outcomes):
            continue
        usable = {method: found for method, found in outcomes.items() if isinstance(found, statistics.Outcomes)}
        differences[metric] = {**{method: {"not_paired": why} for method, why in outcomes.items()
                                  if not isinstance(why, statistics.Outcomes) and method != reference},
                               **statistics.paired_differences(usable, reference)}
    return differences


# report.md

def _number(value, unit="", scale=1.0, digits=1):
    return "–" if value is None else f"{value / scale:.{digits}f}{unit}"


def _duration(seconds):
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _flops(value):
    return "–" if value is None else f"{value:.3g}"


def _steps(value):
    return "–" if value is None else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def metric_cell(spread, seeds):
    """'45.2 ± 0.8%', or '45.2% (1 seed)'; '(n of K seeds)' when some seeds have no value."""
    if spread is None:
        return "–"
    text = f"{100 * spread['mean']:.1f}%" if spread["std"] is None else \
        f"{100 * spread['mean']:.1f} ± {100 * spread['std']:.1f}%"
    if spread["seeds"] < seeds:
        return f"{text} ({spread['seeds']} of {seeds} seeds)"
    return f"{text} (1 seed)" if seeds == 1 else text


def _points(fraction):
    """'+6.9': a fraction in signed percentage points, never '-0.0'."""
    return f"{round(100 * fraction, 1) + 0.0:+.1f}"


def interval_text(difference):
    """'+6.9 [+3.1, +10.5]' in percentage points."""
    return f"{_points(difference['difference'])} [{_points(difference['low'])}, {_points(difference['high'])}]"


def difference_cell(difference, words=True):
    if difference is None:
        return "–"
    if "not_paired" in difference:
        return "– (see the notes)"
    if not words:
        return f"**{interval_text(difference)}**" if difference["distinguishable"] else interval_text(difference)
    return f"{interval_text(difference)}, {'' if difference['distinguishable'] else 'not '}distinguishable"


def status_cell(summary):
    status = summary["status"] if not summary["error"] else f"failed: {summary['error'][:80]}"
    return status.replace("|", "\\|").replace("\n", " ")


def method_cell(method, summary):
    return f"{method} ({summary['preset']}){' ' + CHANGED_MARK if summary['changed'] else ''}"


def main_table(summaries, metrics, reference, main):
    """The table's lines: one row per method."""
    difference_column = [f"Δ {main} vs {reference}, pp [95% CI]"] if main else []
    columns = ["method", "status", "seeds", "steps", "epochs", "training FLOPs", "training time", "peak memory",
               *metrics, *difference_column]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    for method, summary in summaries.items():
        seeds = len(summary["seeds"])
        cells = [method_cell(method, summary), status_cell(summary), str(seeds), _steps(summary["steps"]),
                 _number(summary["epochs"], digits=2), _flops(summary["flops"]),
                 _duration(summary["training_time_s"]), _number(summary["peak_memory_bytes"], " GiB", 2 ** 30, 2),
                 *(metric_cell(summary["metrics"].get(metric), seeds) for metric in metrics)]
        if main:
            cells.append("reference" if method == reference else
                         difference_cell(summary["differences"].get(main)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def differences_table(summaries, reference, metrics):
    """Every metric's difference to the reference, one row per method (bold: distinguishable)."""
    lines = [f"Differences to {reference} at each method's last evaluation, percentage points [95% CI]; **bold**: "
             "the interval excludes 0 (distinguishable), others are not distinguishable from noise.", "",
             "| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for method, summary in summaries.items():
        if method != reference:
            lines.append(f"| {method} | " + " | ".join(
                difference_cell(summary["differences"].get(metric), words=False) for metric in metrics) + " |")
    return lines


def interval_notes(summaries, reference, differences):
    """How the intervals are made, what they cover, and why a method has none."""
    if reference not in summaries:
        return [f"No intervals: the reference method {reference} is not in this comparison (methods: "
                f"{', '.join(summaries)}); add it, or name another with --reference."]
    if not differences:
        return [f"No intervals: {reference} has no evaluation with per-example outcomes to compare with."]
    notes = [f"Intervals: a paired bootstrap ({statistics.DRAWS} draws, RNG seed {statistics.RNG_SEED}): each draw "
             "resamples the evaluation examples with replacement, the same examples for every method, and each "
             "method's seeds with replacement (averaging over them); the interval is the 2.5th-97.5th percentile "
             "of the drawn differences (comparison/statistics.py)."]
    one_seed = [method for method, summary in summaries.items() if len(summary["seeds"]) == 1]
    if len(one_seed) == len(summaries):
        notes.append("Every method has one seed: the intervals cover example noise only, not the variation "
                     "between training runs; train more seeds (--seeds) to include it.")
    elif one_seed:
        notes.append(f"One seed only for {', '.join(one_seed)}: its seed-to-seed variation is not in its intervals.")
    for metric, by_method in differences.items():
        for method, difference in by_method.items():
            if "not_paired" in difference:
                notes.append(f"No {metric} interval for {method}: {difference['not_paired']}.")
    return notes


def changed_notes(summaries):
    return [f"{CHANGED_MARK} {method} seed {seed} was trained before accepted changes of: {', '.join(changed)}."
            for method, summary in summaries.items() for seed, changed in summary["changed"].items()]


def comparison_markdown(name, header, summaries, reference, differences):
    metrics = list(dict.fromkeys(metric for summary in summaries.values() for metric in summary["metrics"]))
    main = main_metric(list(differences))
    lines = [f"# Comparison {name}", "", *header, "", *main_table(summaries, metrics, reference, main), ""]
    if differences:
        lines += [*differences_table(summaries, reference, list(differences)), ""]
    lines += [*interval_notes(summaries, reference, differences), *changed_notes(summaries)]
    return "\n".join(lines) + "\n"


# Charts.

def method_styles(methods):
    """{method: (colour, marker)}: tab10's colours in turn, its light tab20 shades after 10, each with the next
    marker, so that 20 methods are told apart by colour and by marker."""
    colours = plt.get_cmap("tab20").colors  # dark, light, dark, light...
    return {method: (colours[2 * (index % 10) + (index // 10) % 2], MARKERS[index % len(MARKERS)])
            for index, method in enumerate(methods)}


def legend_label(method, summary, reference):
    """The method's name, '(reference)', and its status when it did not finish."""
    label = f"{method} (reference)" if method == reference else method
    if summary["status"] != "finished":
        label += f": {summary['status']}"
    return label if summary["evaluations"] else f"{label}, no evaluation"


def outside_legend(figure, styles, labels):
    """Every method's legend under the panels, in columns; returns its labels."""
    handles = [Line2D([], [], color=colour, marker=marker, linewidth=1.2, markersize=5)
               for colour, marker in styles.values()]
    legend = figure.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8,
                           frameon=False)
    return [text.get_text() for text in legend.get_texts()]


def same_flops_note(summaries):
    """A sentence when every method's last evaluation has the same training FLOPs (within 1%), else ''."""
    last = [summary["evaluations"][-1]["flops"] for summary in summaries.values()
            if summary["evaluations"] and summary["evaluations"][-1]["flops"]]
    if len(last) > 1 and max(last) - min(last) <= SAME_FLOPS_TOLERANCE * max(last):
        return f"every method's last evaluation at the same training FLOPs ({np.mean(last):.3g})"
    return ""


def flops_unit(flops):
    """(divisor, axis label) for FLOPs up to max(flops): a power of ten named in the label, not an offset text."""
    exponent = int(np.floor(np.log10(max(flops)))) if flops and max(flops) > 0 else 0
    return 10.0 ** exponent, f"training FLOPs (× 1e{exponent})"


def draw_metric(axis, metric, summaries, styles, chance):
    """One panel: the metric (mean ± std over seeds, %) against training FLOPs, the chance level when known."""
    divisor, flops_label = flops_unit([entry["flops"] for summary in summaries.values()
                                       for entry in summary["evaluations"] if entry["flops"]])
    for method, summary in summaries.items():
        points = [(entry["flops"], entry["metrics"][metric]) for entry in summary["evaluations"]
                  if entry["flops"] is not None and metric in entry["metrics"]]
        if points:
            colour, marker = styles[method]
            axis.errorbar([flops / divisor for flops, _ in points], [100 * spread["mean"] for _, spread in points],
                          yerr=[100 * (spread["std"] or 0) for _, spread in points], color=colour, marker=marker,
                          markersize=4, linewidth=1.2, capsize=2)
    if metric in chance:
        axis.axhline(100 * chance[metric], color="0.45", linestyle=":", linewidth=1)
        axis.annotate("chance", (0, 100 * chance[metric]), xycoords=("axes fraction", "data"), fontsize=7,
                      color="0.35", xytext=(3, 2), textcoords="offset points")
    low, high = axis.get_ylim()
    if high - low < 2:  # at least 2 points: spreads of a few hundredths are not drawn as cliffs
        middle = (high + low) / 2
        axis.set_ylim(middle - 1, middle + 1)
    axis.set_xlim(0, axis.get_xlim()[1] * 1.03)  # from no training: never a zoom into a sliver of FLOPs
    axis.set_title(metric, fontsize=9)
    axis.set_xlabel(flops_label, fontsize=8)
    axis.set_ylabel("%", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.25)


def plot_metrics_vs_compute(summaries, chance, reference, path):
    """metrics_vs_compute.png: a panel per headline metric (two columns); returns the legend's labels (None when
    no method was evaluated)."""
    metrics = list(dict.fromkeys(metric for summary in summaries.values() for entry in summary["evaluations"]
                                 for metric in entry["metrics"]))
    if not metrics:
        return None
    columns = min(2, len(metrics))
    rows = -(-len(metrics) // columns)
    legend_rows = -(-len(summaries) // 4)
    figure, axes = plt.subplots(rows, columns, figsize=(FIGURE_WIDTH_IN, 2.7 * rows + 0.25 * legend_rows + 0.5),
                                squeeze=False, layout="constrained")
    styles = method_styles(summaries)
    for axis, metric in zip(axes.flat, metrics, strict=False):
        draw_metric(axis, metric, summaries, styles, chance)
    for axis in axes.flat[len(metrics):]:
        axis.set_visible(False)
    note = same_flops_note(summaries)
    figure.suptitle("Results against training compute (mean ± std over seeds)" + (f"\n{note}" if note else ""),
                    fontsize=10)
    labels = outside_legend(figure, styles, [legend_label(method, summary, reference)
                                             for method, summary in summaries.items()])
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return labels


def difference_colour(difference):
    if not difference["distinguishable"]:
        return "#adb5bd"
    return "#2f9e44" if difference["difference"] > 0 else "#e03131"


def plot_differences(differences, summaries, metric, reference, path):
    """differences.png: each method's difference to the reference on `metric` with its 95% interval, sorted,
    the distinguishable ones in colour; returns the labels drawn, top to bottom (None when none is)."""
    drawn = sorted(((method, difference) for method, difference in differences.items() if "not_paired" not in
                    difference), key=lambda item: item[1]["difference"])
    if not drawn:
        return None
    figure, axis = plt.subplots(figsize=(FIGURE_WIDTH_IN, 1.6 + 0.32 * len(drawn)), layout="constrained")
    values = [100 * difference["difference"] for _, difference in drawn]
    errors = [[100 * (difference["difference"] - difference["low"]) for _, difference in drawn],
              [100 * (difference["high"] - difference["difference"]) for _, difference in drawn]]
    axis.barh(range(len(drawn)), values, xerr=errors, color=[difference_colour(d) for _, d in drawn], height=0.6,
              error_kw={"capsize": 3, "linewidth": 1, "ecolor": "0.2"})
    axis.axvline(0, color="black", linewidth=1)
    labels = [legend_label(method, summaries[method], reference) for method, _ in drawn]
    axis.set_yticks(range(len(drawn)), labels, fontsize=8)
    axis.set_xlabel(f"{metric}: difference to {reference}, percentage points (95% CI)", fontsize=8)
    axis.tick_params(axis="x", labelsize=7)
    axis.grid(axis="x", alpha=0.25)
    missing = [method for method, difference in differences.items() if "not_paired" in difference]
    axis.set_title(f"{metric} vs {reference} at each method's last evaluation"
                   + (f"\nno interval: {', '.join(missing)} (see report.md)" if missing else ""), fontsize=9)
    figure.legend(handles=[Patch(color="#2f9e44", label=f"better than {reference}"),
                         Patch(color="#e03131", label=f"worse than {reference}"),
                         Patch(color="#adb5bd", label="not distinguishable (interval includes 0)")],
                loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return labels[::-1]


def shared_loss_curve(seed_runs):
    """(steps, mean over seeds of SHARED_LOSS) at the steps every seed that logged it logged, or None."""
    per_seed = [{row["step"]: row[SHARED_LOSS] for row in read_metrics(run["run_dir"]) if SHARED_LOSS in row}
                for run in seed_runs.values()]
    per_seed = [rows for rows in per_seed if rows]
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(rows) for rows in per_seed)))
    return np.array(steps), np.array([np.mean([rows[step] for rows in per_seed]) for step in steps])


def moving_average(values, window):
    """(len - window + 1,) means of `window` consecutive values."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_shared_loss(runs, summaries, reference, path):
    """loss_curves.png: SHARED_LOSS against training FLOPs, one line per method (mean over seeds, a moving
    average); returns the legend's labels (None when no method logged it)."""
    curves = {method: shared_loss_curve(seed_runs) for method, seed_runs in runs.items()}
    drawn = {method: curve for method, curve in curves.items() if curve is not None and len(curve[0])
             and summaries[method]["flops_per_step"]}
    if not drawn:
        return None
    styles = {method: style for method, style in method_styles(summaries).items() if method in drawn}
    figure, axis = plt.subplots(figsize=(FIGURE_WIDTH_IN, 4.2 + 0.25 * -(-len(drawn) // 4)), layout="constrained")
    divisor, flops_label = flops_unit([curve[0][-1] * summaries[method]["flops_per_step"]
                                       for method, curve in drawn.items()])
    windows = []
    for method, (steps, losses) in drawn.items():
        window = max(1, len(steps) // 30)
        windows.append(window)
        colour, marker = styles[method]
        axis.plot(moving_average(steps, window) * summaries[method]["flops_per_step"] / divisor,
                  moving_average(losses, window), color=colour, marker=marker, markevery=max(1, len(steps) // 8),
                  markersize=4, linewidth=1.2)
    axis.set_xlim(0, axis.get_xlim()[1])
    axis.set_xlabel(flops_label, fontsize=8)
    axis.set_ylabel(f"{SHARED_LOSS} (InfoNCE)", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.25)
    without = [method for method in runs if method not in drawn]
    smoothing = f", moving average of {max(windows)} logged steps" if max(windows) > 1 else ""
    axis.set_title(f"{SHARED_LOSS}, the CLIP InfoNCE term of the training loss (mean over seeds{smoothing})"
                   + (f"\nnot drawn (no {SHARED_LOSS} logged, or no FLOPs measured): {', '.join(without)}"
                      if without else ""), fontsize=9)
    labels = outside_legend(figure, styles, [legend_label(method, summaries[method], reference) for method in drawn])
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return labels


def comparison_charts(runs, summaries, reference, differences, out_dir):
    """metrics_vs_compute.png, differences.png and loss_curves.png in out_dir, those with something to draw;
    returns {file name: its legend labels (the methods drawn, for differences.png)}."""
    chance = next((chance_levels(entry["results"]) for seed_runs in runs.values() for run in seed_runs.values()
                   for entry in run["evaluations"]), {})
    main = main_metric(list(differences))
    charts = {"metrics_vs_compute.png": plot_metrics_vs_compute(summaries, chance, reference,
                                                                out_dir / "metrics_vs_compute.png"),
              "differences.png": plot_differences(differences[main], summaries, main, reference,
                                                  out_dir / "differences.png") if main else None,
              "loss_curves.png": plot_shared_loss(runs, summaries, reference, out_dir / "loss_curves.png")}
    for name, labels in charts.items():
        if labels is None:
            (out_dir / name).unlink(missing_ok=True)  # a chart of an earlier report, now with nothing to draw
    return {name: labels for name, labels in charts.items() if labels is not None}


CHART_CAPTIONS = {"metrics_vs_compute.png": "each metric against training FLOPs, mean ± std over seeds",
                  "differences.png": "each method's difference to the reference with its 95% interval",
                  "loss_curves.png": "the InfoNCE term every softmax-CLIP method shares, against training FLOPs"}


def write_comparison(out_dir, name, header, plan, runs, reference="clip", publish_dir=None):
    """report.md (the tables, then the charts), report.json and the charts of `runs` ({method: {seed: {"run_dir",
    "entry", "evaluations", "failure", "changed"}}}) compared with `reference`; report.md and the charts also to
    `publish_dir` when given (a documentation folder: the report as the command wrote it). Returns (the table,
    {method: summary})."""
    out_dir = Path(out_dir)
    summaries = {method: method_over_seeds(seed_runs) for method, seed_runs in runs.items()}
    differences = reference_differences(runs, summaries, reference)
    for metric, by_method in differences.items():
        for method, difference in by_method.items():
            summaries[method]["differences"][metric] = difference
    charts = comparison_charts(runs, summaries, reference, differences, out_dir)
    table = comparison_markdown(name, header, summaries, reference, differences)
    (out_dir / "report.md").write_text(table + "".join(f"\n![{CHART_CAPTIONS[chart]}]({chart})\n" for chart in charts))
    if publish_dir is not None:
        publish(out_dir, Path(publish_dir), list(charts))
    report = {"name": name, "header": header, "reference": reference,
              "statistics": {"draws": statistics.DRAWS, "rng_seed": statistics.RNG_SEED,
                             "confidence": statistics.CONFIDENCE, "how": statistics.__doc__},
              "charts": list(charts), "methods": summaries, "plan": plan}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return table, summaries


def publish(out_dir, publish_dir, charts):
    """report.md and `charts` of out_dir copied to publish_dir, whose charts of an earlier report are removed."""
    publish_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(CHART_CAPTIONS) - set(charts):
        (publish_dir / stale).unlink(missing_ok=True)
    for name in ["report.md", *charts]:
        shutil.copyfile(out_dir / name, publish_dir / name)
