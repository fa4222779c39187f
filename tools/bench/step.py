"""Harmony's cost against CLIP alone, same backbone, batch and precision, side by side in one run.

Times forward + backward of every enabled group (teachers included) for the `demo` preset and for
the same preset with only CLIP (`clip_demo`), on synthetic batches, and reports each group's share
and the activation memory ratio (bytes saved for backward, per-group peak). The optimizer step is
left out: it is the same AdamW over more parameters. Writes <out>/step.json and .png.

    python -m tools.bench.step --out runs/bench
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch

from model.harmony import Harmony
from tools.bench.backward_memory import backward_each_group, synthetic_batch
from train.config import load_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def time_step(preset, repeats, device):
    config = load_config(preset)
    torch.manual_seed(0)
    model = Harmony(config.model).to(device)
    inputs = synthetic_batch(config.model, config.data.batch_size, config.data.local_crop_px,
                             config.data.local_crops_number, device)
    seconds = {"teachers": 0.0, **{group: 0.0 for group in model.backward_groups}}
    peak_saved = 0
    for repeat in range(repeats + 1):  # the first is a warm-up
        elapsed, started = {}, time.perf_counter()
        for part, saved in backward_each_group(model, inputs):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            elapsed[part], started = now - started, now
            peak_saved = max(peak_saved, saved)
        if repeat:
            for name, value in elapsed.items():
                seconds[name] += value / repeats
    return {"preset": preset, "batch": config.data.batch_size, "step_s": sum(seconds.values()),
            "seconds_per_part": seconds, "peak_saved_bytes": peak_saved}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    harmony, clip = (time_step(preset, args.repeats, device) for preset in ("demo", "clip_demo"))
    result = {"device": device, "harmony": harmony, "clip_only": clip,
              "time_harmony_vs_clip": round(harmony["step_s"] / clip["step_s"], 2),
              "memory_harmony_vs_clip": round(harmony["peak_saved_bytes"] / clip["peak_saved_bytes"], 2),
              "share_of_harmony_step": {name: round(value / harmony["step_s"], 3)
                                        for name, value in harmony["seconds_per_part"].items()}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step.json").write_text(json.dumps(result, indent=2))
    figure, axis = plt.subplots(figsize=(6, 2.4))
    left = 0.0
    for name, share in result["share_of_harmony_step"].items():
        axis.barh(["Harmony step"], [share * result["time_harmony_vs_clip"]], left=left, label=name)
        left += share * result["time_harmony_vs_clip"]
    axis.barh(["CLIP step"], [1.0], color="#999999")
    axis.set_xlabel("time relative to a CLIP-only step")
    axis.set_title(f"demo shapes on {device}: Harmony = {result['time_harmony_vs_clip']:.2f}x CLIP time, "
                   f"{result['memory_harmony_vs_clip']:.2f}x activation memory", fontsize=8)
    axis.legend(fontsize=7, ncol=5, loc="lower right")
    figure.tight_layout()
    figure.savefig(out_dir / "step.png", dpi=120)
    print(f"bench step ({device}, demo shapes): Harmony = {result['time_harmony_vs_clip']:.2f}x a CLIP-only step, "
          f"{result['memory_harmony_vs_clip']:.2f}x its activation memory; shares "
          f"{result['share_of_harmony_step']}; written to {out_dir / 'step.json'} and step.png")


if __name__ == "__main__":
    main()
