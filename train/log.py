"""Run outputs: metrics.jsonl, TensorBoard event files, and PNG plots of every logged series.

    python -m train.log runs/<run>     # redraws runs/<run>/plots/*.png from metrics.jsonl
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch.utils.tensorboard import SummaryWriter

# The series that are not loss terms: the schedules and learned scalars (plots/schedules.png) and the run's own
# measurements. Every other series a run logs is a loss term of its method (plots/losses.png), whatever the method.
SCHEDULES = ("lr", "weight_decay", "teacher_momentum", "clip_hard_weight", "teacher_cls_temp", "teacher_patch_temp",
             "logit_scale", "rocket_logit_scale", "logit_bias")
MEASUREMENTS = ("step", "images_per_s", "data_wait_fraction", "nonfinite_steps", "gradient_bytes_all_reduced",
                "peak_memory_bytes", "peak_rss_bytes")


def loss_terms(rows):
    """The loss terms the rows hold, the total first, then in the order they were logged."""
    names = dict.fromkeys(name for row in rows for name in row)
    terms = [name for name in names if name not in SCHEDULES + MEASUREMENTS and not name.startswith("grad_norm/")]
    return sorted(terms, key=lambda name: name != "loss")


class MetricsLog:
    """Appends one row per logged step. A resumed run starts after `resume_step`: rows past it (logged
    after the checkpoint it resumes from, by the run that stopped) are removed from metrics.jsonl and
    hidden from TensorBoard, so every step is logged once."""

    def __init__(self, run_dir, resume_step=0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if self.path.is_file():
            kept = [row for row in self.path.read_text().splitlines() if _step(row) <= resume_step]
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text("".join(row + "\n" for row in kept))
            partial.replace(self.path)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step, values):
        with open(self.path, "a") as stream:
            stream.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self):
        self.writer.close()
        return plot_run(self.run_dir)


def _step(row):
    """The step of a metrics.jsonl row; a row cut short by a killed process counts as past every step."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _plot(rows, names, title, path, log_scale=False):
    present = [name for name in names if any(name in row for row in rows)]
    if not present:
        return None
    columns = min(len(present), 4)
    figure, axes = plt.subplots((len(present) + columns - 1) // columns, columns,
                                figsize=(3.2 * columns, 2.4 * ((len(present) + columns - 1) // columns)),
                                squeeze=False)
    for axis, name in zip(axes.flat, present, strict=False):
        steps = [row["step"] for row in rows if name in row]
        axis.plot(steps, [row[name] for row in rows if name in row], linewidth=1.2,
                  marker="o" if len(steps) < 20 else None, markersize=3)  # a term logged at few steps stays visible
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        if log_scale:
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(present):]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(run_dir):
    """Draw plots/losses.png (every loss term the run logged) and plots/schedules.png (the schedules and learned
    scalars its method has) from metrics.jsonl; returns the paths written."""
    rows = [row for row in read_metrics(run_dir) if "loss" in row]
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [_plot(rows, loss_terms(rows), f"losses: {Path(run_dir).name}", plots / "losses.png"),
               _plot(rows, SCHEDULES, f"schedules: {Path(run_dir).name}", plots / "schedules.png")]
    return [path for path in written if path is not None]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m train.log runs/<run>")
    print("\n".join(f"wrote {path}" for path in plot_run(sys.argv[1])))
