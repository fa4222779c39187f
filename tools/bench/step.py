"""Harmony's cost against CLIP alone, same backbone, batch and precision, side by side in one run.

For each shape (`--shapes`: the `demo` preset and ViT-S/16 by default; ViT-B/16 at batch 96 for GPUs; all at
the paper's 224 + 8 x 96 px crops but the demo) it times
forward + backward of every enabled group, teachers included, for Harmony and for the same model with
only CLIP, on synthetic batches. It reports each group's share of the step, the FLOPs of each
(torch's FlopCounterMode, attention counted through the math kernel), each group's activation memory
peak (the most bytes of tensors the step made alive at once: tools/bench/live_bytes.py; and
torch.cuda.max_memory_allocated on a GPU), with and without activation checkpointing, and before/after
figures for trimming caption padding. The optimizer step is left out: it is the same AdamW over more
parameters. On a GPU the groups run under bf16 autocast and model FLOPs utilisation is reported against
the GPU's bf16 peak. Then every method's step (its preset's objectives: `<method>/demo` at the demo shape,
`<method>/cc3m` at ViT-S/16) against CLIP's, time and activation memory (`--methods`). Writes <out>/step.json
and .png. With --compile, every transformer block is compiled with torch.compile and Harmony and CLIP-only are
timed again (step_compiled.json and .png).

    python -m tools.bench.step --out runs/bench [--methods clip siglip ...]
    python -m tools.bench.step --shapes vit_b --vit-b-batch 96 --compile     # on a GPU
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.meta_arch import MetaArch
from tools.bench.backward_memory import backward_each_group, recipe_inputs, synthetic_batch
from tools.bench.live_bytes import LiveTensorBytes
from tools.gpu.profile import tiny_overrides
from train import presets
from train.config import load_config
from train.pretrain import autocast
from train.step_inputs import view_recipe

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PRECISION = {"cuda": "bf16", "cpu": "fp32"}  # the trainer's autocast: bf16 on a GPU, as the GPU presets
METHODS = tuple(presets.discover("demo"))  # every method with a demo preset
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per GPU


def shapes(vit_s_batch, vit_b_batch):
    """key -> (name, Harmony config, batch, local crop px, local crops)."""
    demo = load_config("harmony/demo")
    return {
        "demo": ("demo", demo.model, demo.data.batch_size, demo.data.local_crop_px, demo.data.local_crops_number),
        "vit_s": ("ViT-S/16, 224 + 8 x 96 px", load_config("harmony/cc3m_vit_s").model, vit_s_batch, 96, 8),
        "vit_b": ("ViT-B/16, 224 + 8 x 96 px", load_config("harmony/cc3m").model, vit_b_batch, 96, 8),
        # The smallest model of every group, for a dry run of this benchmark (the tests' GPU-check stages).
        "tiny": ("tiny (tests)", load_config("harmony/demo", tiny_overrides("harmony/demo")).model, 4, 16, 2),
    }


def clip_only(config):
    """`config`'s towers with its CLIP objective alone, without soft targets."""
    clip = dataclasses.replace(config.objectives["clip"], soft_targets=False)
    return dataclasses.replace(config, objectives={"clip": clip})


def compile_blocks(model, backend):
    """torch.compile each transformer block of the students and teachers (ViT, MAE decoder, text tower, MLM
    decoder): the blocks are the step's time, and per-block graphs need no change to the per-pass step."""
    blocks = [module for module in model.modules() if type(module).__name__ in ("Block", "ResidualAttentionBlock")]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def method_costs(methods, vit_s_batch, repeats, device):
    """{shape: {method: step time, activation peak and both relative to CLIP's}}, each method's own preset
    (objectives, crops) at the shape: `<method>/demo` as it is; `<method>/cc3m` with a ViT-S/16."""
    demo = load_config("harmony/demo")
    scales = {"demo": ("demo", {}, demo.data.batch_size, demo.data.local_crop_px),
              "ViT-S/16, 224 px (+ 8 x 96 px local crops where a method has them)":
              ("cc3m", {"vit_size": "small"}, vit_s_batch, 96)}
    results = {}
    for shape, (scale, overrides, batch, local_px) in scales.items():
        runs = {}
        for method in ("clip", *[name for name in methods if name != "clip"]):
            preset = load_config(f"{method}/{scale}")
            recipe = view_recipe(preset) if preset.data.views != "auto" else None
            runs[method] = measure(dataclasses.replace(preset.model, **overrides), batch, local_px,
                                   preset.data.local_crops_number, repeats, device, recipe=recipe)
        clip = runs["clip"]
        results[shape] = {method: {"batch": batch, "step_s": run["step_s"],
                                   "activation_peak_bytes": run["activation_peak_bytes"],
                                   "time_vs_clip": run["step_s"] / clip["step_s"],
                                   "memory_vs_clip": run["activation_peak_bytes"] / clip["activation_peak_bytes"]}
                          for method, run in runs.items()}
    return results


def one_step(model, inputs, device, trim):
    """{part: seconds} and {part: bytes saved for backward} of one step."""
    seconds, saved_per_part, started = {}, {}, time.perf_counter()
    with autocast(torch.device(device), PRECISION[device]):
        for part, saved in backward_each_group(model, inputs, trim=trim):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            seconds[part], saved_per_part[part], started = now - started, max(saved, default=0), now
    return seconds, saved_per_part


def live_peak_per_part(model, inputs, device, trim):
    """{part: the most bytes of step-made tensors alive at once during it}: activations, saved tensors, teacher
    outputs still held, transients. Parameters, gradients (accumulated in place after the warm-up) and the
    batch are not counted."""
    peaks = {}
    with LiveTensorBytes() as memory, autocast(torch.device(device), PRECISION[device]):
        for part, _ in backward_each_group(model, inputs, trim=trim):
            peaks[part] = memory.peak
            memory.reset_peak()
    return peaks


def flops_per_part(model, inputs, device, trim):
    """{part: FLOPs of its forward + backward}. Attention runs through the math kernel so its matmuls count."""
    counts, previous = {}, 0
    with (FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH),
          autocast(torch.device(device), PRECISION[device])):
        for part, _ in backward_each_group(model, inputs, trim=trim):
            total = counter.get_total_flops()
            counts[part], previous = total - previous, total
    return counts


def measure(config, batch, local_px, locals_number, repeats, device, trim=True, compile_backend=None, recipe=None):
    """With compile_backend, FLOPs and activation peaks are counted on the eager model (counting modes do not see
    inside compiled code), then the blocks are compiled for the warm-up (which compiles) and the timed steps.
    recipe: a method's own views (data.views other than auto), else Harmony's or CLIP's crops."""
    torch.manual_seed(0)
    model = MetaArch(config).to(device)
    inputs = recipe_inputs(recipe, batch, device) if recipe else \
        synthetic_batch(config, batch, local_px, locals_number if "ibot" in config.objectives else 0, device)
    flops = flops_per_part(model, inputs, device, trim)
    one_step(model, inputs, device, trim)  # warm-up: gradients exist from here on
    live_peaks = live_peak_per_part(model, inputs, device, trim)
    if compile_backend:
        compile_blocks(model, compile_backend)
        one_step(model, inputs, device, trim)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, peak_saved = {part: 0.0 for part in flops}, 0
    for _ in range(repeats):
        step_seconds, saved = one_step(model, inputs, device, trim)
        for part, value in step_seconds.items():
            seconds[part] += value / repeats
        peak_saved = max(peak_saved, *saved.values())
    result = {"batch": batch, "trim_caption_padding": trim, "step_s": sum(seconds.values()),
              "seconds_per_part": seconds, "flops_per_part": flops, "step_flops": sum(flops.values()),
              "peak_saved_bytes": peak_saved, "live_peak_bytes_per_part": live_peaks,
              "activation_peak_bytes": max(live_peaks.values())}
    result["achieved_tflops"] = result["step_flops"] / result["step_s"] / 1e12
    result["images_per_s"] = batch / result["step_s"]
    if device == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def peak_tflops(device, override):
    if override:
        return override
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def compare(name, config, batch, local_px, locals_number, repeats, device, peak, compile_backend=None):
    """Harmony against CLIP-only on one shape; eager, also with checkpointing and with caption padding kept.
    Compiled (compile_backend), Harmony and CLIP-only alone: each variant would compile again."""
    clip_config = clip_only(config)
    runs = {"harmony": measure(config, batch, local_px, locals_number, repeats, device,
                               compile_backend=compile_backend),
            "clip_only": measure(clip_config, batch, local_px, 0, repeats, device, compile_backend=compile_backend)}
    harmony, clip = runs["harmony"], runs["clip_only"]
    result = {"shape": name, **runs,
              "time_harmony_vs_clip": harmony["step_s"] / clip["step_s"],
              "flops_harmony_vs_clip": harmony["step_flops"] / clip["step_flops"],
              "memory_harmony_vs_clip": harmony["activation_peak_bytes"] / clip["activation_peak_bytes"],
              "saved_for_backward_harmony_vs_clip": harmony["peak_saved_bytes"] / clip["peak_saved_bytes"],
              "share_of_harmony_step": {part: value / harmony["step_s"]
                                        for part, value in harmony["seconds_per_part"].items()},
              "share_of_harmony_flops": {part: value / harmony["step_flops"]
                                         for part, value in harmony["flops_per_part"].items()}}
    if not compile_backend:
        runs.update(harmony_checkpointed=measure(dataclasses.replace(config, activation_checkpointing=True), batch,
                                                 local_px, locals_number, repeats, device),
                    harmony_untrimmed=measure(config, batch, local_px, locals_number, repeats, device, trim=False),
                    clip_only_untrimmed=measure(clip_config, batch, local_px, 0, repeats, device, trim=False))
        result.update({name: runs[name] for name in ("harmony_checkpointed", "harmony_untrimmed",
                                                     "clip_only_untrimmed")})
        result.update(
            # Activation checkpointing in Harmony's students against the plain CLIP-only step, and its time cost.
            memory_checkpointed_vs_clip=runs["harmony_checkpointed"]["activation_peak_bytes"] /
            clip["activation_peak_bytes"],
            time_checkpointed_vs_harmony=runs["harmony_checkpointed"]["step_s"] / harmony["step_s"],
            trim_speedup_harmony=runs["harmony_untrimmed"]["step_s"] / harmony["step_s"],
            trim_speedup_clip_only=runs["clip_only_untrimmed"]["step_s"] / clip["step_s"])
    if "max_memory_allocated_bytes" in harmony:
        result["max_memory_allocated_harmony_vs_clip"] = (harmony["max_memory_allocated_bytes"] /
                                                          clip["max_memory_allocated_bytes"])
    if peak:
        for run in runs.values():
            run["model_flops_utilisation"] = run["achieved_tflops"] / peak
    return result


def plot(results, device, path):
    figure, axes = plt.subplots(len(results), 2, figsize=(13, 2.8 * len(results)), squeeze=False)
    for (time_axis, memory_axis), result in zip(axes, results, strict=True):
        left = 0.0
        for part, share in result["share_of_harmony_step"].items():
            width = share * result["time_harmony_vs_clip"]
            time_axis.barh(["Harmony step"], [width], left=left, label=part)
            left += width
        time_axis.barh(["FLOPs ratio"], [result["flops_harmony_vs_clip"]], color="#cccccc")
        time_axis.barh(["CLIP step"], [1.0], color="#999999")
        time_axis.set_xlabel("relative to a CLIP-only step")
        time_axis.set_title(f"{result['shape']}, batch {result['harmony']['batch']} on {device}: "
                            f"{result['time_harmony_vs_clip']:.2f}x time, {result['flops_harmony_vs_clip']:.2f}x FLOPs",
                            fontsize=8)
        time_axis.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.35))
        parts = list(result["harmony"]["live_peak_bytes_per_part"])
        positions = range(len(parts))
        drawn = [(run, label) for run, label in (("harmony", "Harmony"),
                                                 ("harmony_checkpointed", "with activation checkpointing"))
                 if run in result]
        for offset, (run, label) in enumerate(drawn):
            peaks = result[run]["live_peak_bytes_per_part"]
            memory_axis.bar([x + 0.4 * offset for x in positions], [peaks[part] / 2**20 for part in parts], 0.4,
                            label=label)
        memory_axis.axhline(result["clip_only"]["activation_peak_bytes"] / 2**20, color="#b04040", linestyle="--",
                            label="CLIP-only step")
        memory_axis.set_xticks([x + 0.2 for x in positions], parts, fontsize=7)
        memory_axis.set_ylabel("MiB alive at the peak")
        checkpointed = (f", {result['memory_checkpointed_vs_clip']:.2f}x with checkpointing"
                        if "memory_checkpointed_vs_clip" in result else "")
        memory_axis.set_title(f"activation memory: {result['memory_harmony_vs_clip']:.2f}x CLIP's{checkpointed}",
                              fontsize=8)
        memory_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary_line(result, device):
    shares = ", ".join(f"{part} {100 * share:.0f}%" for part, share in result["share_of_harmony_step"].items())
    line = (f"bench step ({device}, {result['shape']}): Harmony = {result['time_harmony_vs_clip']:.2f}x a CLIP-only "
            f"step ({result['flops_harmony_vs_clip']:.2f}x its FLOPs), {result['memory_harmony_vs_clip']:.2f}x its "
            f"activation memory")
    if "memory_checkpointed_vs_clip" in result:
        line += (f" ({result['memory_checkpointed_vs_clip']:.2f}x with activation checkpointing, at "
                 f"{result['time_checkpointed_vs_harmony']:.2f}x the time); shares {shares}; trimming caption padding "
                 f"made Harmony {result['trim_speedup_harmony']:.2f}x and CLIP {result['trim_speedup_clip_only']:.2f}x "
                 "faster")
    else:
        line += f"; shares {shares}"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", choices=("demo", "vit_s", "vit_b", "tiny"), default=["demo", "vit_s"])
    parser.add_argument("--vit-s-batch", type=int, default=8)
    parser.add_argument("--vit-b-batch", type=int, default=96)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every transformer block; writes step_compiled.json and .png")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (eager: tracing only)")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 peak, for MFU (GPUs are looked up)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="methods whose step to compare with CLIP's (none: skip)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(device, args.peak_tflops)
    compile_backend = args.compile_backend if args.compile else None
    available = shapes(args.vit_s_batch, args.vit_b_batch)
    results = [compare(*available[key], args.repeats, device, peak, compile_backend) for key in args.shapes]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "step_compiled" if args.compile else "step"
    methods = method_costs(args.methods, args.vit_s_batch, args.repeats, device) if args.methods else {}
    (out_dir / f"{name}.json").write_text(json.dumps({"device": device, "peak_tflops": peak,
                                                      "compile": compile_backend, "results": results,
                                                      "methods": methods}, indent=2))
    plot(results, device, out_dir / f"{name}.png")
    for result in results:
        print(summary_line(result, device))
        for run in ("harmony", "harmony_checkpointed", "clip_only"):
            if run in result:
                peaks = ", ".join(f"{part} {value / 2**20:.0f}" for part, value in
                                  result[run]["live_peak_bytes_per_part"].items())
                print(f"  activation peaks of {run} (MiB): {peaks}")
    for shape, runs in methods.items():
        print(f"methods' steps against CLIP's ({device}, {shape}): " + ", ".join(
            f"{method} {run['time_vs_clip']:.2f}x time, {run['memory_vs_clip']:.2f}x memory"
            for method, run in runs.items()))
    print(f"written to {out_dir / name}.json and {name}.png")


if __name__ == "__main__":
    main()
