"""BENCHMARKS.md from the results `make bench` left in runs/bench, with the machine and versions.

    python -m tools.bench.report --results runs/bench --out BENCHMARKS.md

Each section is written only when its JSON exists; the charts are copied next to the report
(docs/benchmarks/) so that the committed report shows them.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from tools.gpu.report import markdown

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "timm", "open_clip_torch", "webdataset", "img2dataset")
# Per-group activation peaks measured by tools/bench/step.py before the passes existed (for the table).
BEFORE_PASSES_FILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "step_memory_before.json"
BEFORE_PASSES = json.loads(BEFORE_PASSES_FILE.read_text()) if BEFORE_PASSES_FILE.exists() else {}
# `make gpu-check` results recorded from borrowed GPU machines (README "Validating on a GPU machine").
GPU_RESULTS_DIR = BEFORE_PASSES_FILE.parent / "gpu"
GOALS = {"time": 3.0, "memory": 1.8, "memory_checkpointed": 1.2, "time_checkpointed": 1.35, "communication": 1.0,
         "dali_vs_torch": 2.0, "output_peak": 1.1, "rss_bytes_per_sample": 80, "dedup_time": 1.2,
         "remote_cold": 0.8, "remote_warm": 0.95}


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine():
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "versions": versions}


def verdict(value, goal, lower_is_better=True):
    met = value <= goal if lower_is_better else value >= goal
    return f"goal {'<=' if lower_is_better else '>='} {goal:g}x: {'met' if met else 'not met'}"


def section_shards(result):
    return [
        "## make shards", "",
        f"- Steady-state cleaning per core = **{result['steady_state_per_core_vs_pillow_decode']:.2f}x** a bare "
        f"Pillow decode ({result['steady_state_samples_per_s_1_core']:.0f} vs "
        f"{result['pillow_decode_samples_per_s_1_core']:.0f} samples/s on one core).",
        f"- Whole `make shards` on 2 processes = {result['scaling_2_processes_vs_1']:.2f}x one process "
        f"({result['note']}).", "", "![shards](docs/benchmarks/shards.png)", ""]


def section_datapipe(result):
    lines = ["## View recipes: DALI CPU vs the torch reference", "",
             f"Each recipe at its defaults (224 px crops), batch {result['batch_size']}, "
             f"{result['workers_or_threads']} threads or workers (so the ratio is per core too).", "",
             "| recipe | DALI CPU samples/s | torch samples/s | ratio |", "|---|---:|---:|---|"]
    for name, row in result["recipes"].items():
        ratio = row["dali_cpu_vs_torch_reference"]
        lines.append(f"| {name} | {row['dali_cpu_samples_per_s']:.0f} | {row['torch_reference_samples_per_s']:.0f} | "
                     f"**{ratio:.2f}x** ({verdict(ratio, GOALS['dali_vs_torch'], lower_is_better=False)}) |")
    text = result["text_chain_us_per_caption"]
    lines += ["", f"- Text chain (stop words + one EDA operation, CLIP 🚀's strong caption), one core: "
              f"{text['augment']:.0f} us per caption to augment, {text['tokenize']:.0f} us to tokenize "
              f"({text['captions']} captions of the shards).",
              f"- Stop words (our substitute list, README): {100 * text['stop_word_share']:.1f}% of the caption words; "
              f"auxiliary verbs, stop words in NLTK's list but not in ours, are "
              f"{100 * text['auxiliary_verb_share']:.1f}% and stay in the captions."]
    if "dali_gpu_samples_per_s" in result["recipes"]["MultiCrop"]:
        lines.append(f"- DALI on the GPU, MultiCrop: {result['recipes']['MultiCrop']['dali_gpu_samples_per_s']:.0f} "
                     "samples/s.")
    return lines + ["", "![datapipe](docs/benchmarks/datapipe.png)", ""]


def section_remote_shards(result):
    rates = result["samples_per_s"]
    peak, limit = result["limited_cache_peak_bytes"], result["limited_cache_limit_bytes"]
    return ["## Shards in object storage", "",
            f"`{result['shards']}` ({result['set_bytes'] / 1e6:.1f} MB) served by a moto S3 server on 127.0.0.1; "
            f"{result['recipe']}, batch {result['batch_size']}, {result['threads']} threads, shuffle window "
            f"{result['shuffle_window']}; whole epochs after one warm-up batch.", "",
            f"- Cold cache (every shard fetched during the epoch) = **{result['cold_vs_local']:.2f}x** local shards "
            f"({rates['cold cache']:.0f} vs {rates['local']:.0f} samples/s; "
            f"{verdict(result['cold_vs_local'], GOALS['remote_cold'], lower_is_better=False)}).",
            f"- Warm cache = **{result['warm_vs_local']:.2f}x** local shards ({rates['warm cache']:.0f} samples/s; "
            f"{verdict(result['warm_vs_local'], GOALS['remote_warm'], lower_is_better=False)}).",
            f"- A cache limited to {limit / result['set_bytes']:.0%} of the set ({limit / 1e6:.1f} MB): peak "
            f"{peak / 1e6:.1f} MB = **{peak / limit:.2f}x** the limit (goal <= 1x), {rates['limited cache']:.0f} "
            "samples/s.", ""]


def section_memory(result):
    lines = ["## Activation memory: one backward per objective vs one combined backward", "",
             "| shape | batch | per-group peak | combined | ratio |", "|---|---:|---:|---:|---:|"]
    for row in result["results"]:
        lines.append(f"| {row['shape']} | {row['batch']} | {row['per_group_backward_peak_bytes'] / 2**20:.0f} MiB "
                     f"| {row['combined_backward_peak_bytes'] / 2**20:.0f} MiB "
                     f"| **{row['per_group_vs_combined']:.2f}x** |")
    return lines + ["", "![memory](docs/benchmarks/backward_memory.png)", ""]


def section_step(result):
    lines = ["## Harmony vs CLIP-only step (same backbone, batch and precision)", "",
             "| shape | time | FLOPs | activation memory | trimming captions: Harmony, CLIP |",
             "|---|---:|---:|---:|---:|"]
    for row in result["results"]:
        lines.append(f"| {row['shape']}, batch {row['harmony']['batch']} | **{row['time_harmony_vs_clip']:.2f}x** | "
                     f"{row['flops_harmony_vs_clip']:.2f}x | **{row['memory_harmony_vs_clip']:.2f}x** | "
                     f"{row['trim_speedup_harmony']:.2f}x, {row['trim_speedup_clip_only']:.2f}x faster |")
    lines.append("")
    for row in result["results"]:
        shares = ", ".join(f"{part} {100 * share:.0f}%" for part, share in row["share_of_harmony_step"].items())
        flops = ", ".join(f"{part} {100 * share:.0f}%" for part, share in row["share_of_harmony_flops"].items())
        lines.append(f"- {row['shape']}: time shares {shares}; FLOP shares {flops}. Time "
                     f"{verdict(row['time_harmony_vs_clip'], GOALS['time'])}; activation memory "
                     f"{verdict(row['memory_harmony_vs_clip'], GOALS['memory'])}.")
        if row["time_harmony_vs_clip"] < 1.25 * row["flops_harmony_vs_clip"]:
            lines.append(f"  The time ratio follows the FLOP ratio ({row['flops_harmony_vs_clip']:.2f}x): the cost is "
                         "the work the objectives ask for (iBOT on the global and local crops, the MAE decoder on "
                         "every patch, the teachers), not overhead around it.")
        if "model_flops_utilisation" in row["harmony"]:
            lines.append(f"  MFU: Harmony {100 * row['harmony']['model_flops_utilisation']:.1f}%, CLIP-only "
                         f"{100 * row['clip_only']['model_flops_utilisation']:.1f}%; "
                         f"{row['harmony']['images_per_s']:.0f} images/s (forward + backward, no optimizer).")
    lines += ["", "Activation memory (the most bytes of tensors a step made alive at once; tools/bench/live_bytes.py): "
              "each group's peak, MiB. Before: the same measure at commit "
              f"{BEFORE_PASSES.get('commit', '?')}, before iBOT, MAE and the MLM logits were split into passes and "
              "chunks and the teacher iBOT head cut to what its readers use.", ""]
    for row in result["results"]:
        before = BEFORE_PASSES.get("results", {}).get(row["shape"], {}).get("harmony", {})
        lines += [f"{row['shape']}, batch {row['harmony']['batch']}:", "",
                  "| group | before | now | with activation checkpointing |", "|---|---:|---:|---:|"]
        for part, now in row["harmony"]["live_peak_bytes_per_part"].items():
            earlier = f"{before[part] / 2**20:.0f}" if part in before else "-"
            lines.append(f"| {part} | {earlier} | {now / 2**20:.0f} | "
                         f"{row['harmony_checkpointed']['live_peak_bytes_per_part'][part] / 2**20:.0f} |")
        lines += [f"| CLIP-only step | | {row['clip_only']['activation_peak_bytes'] / 2**20:.0f} | |", "",
                  f"- Harmony / CLIP-only: **{row['memory_harmony_vs_clip']:.2f}x** "
                  f"({verdict(row['memory_harmony_vs_clip'], GOALS['memory'])}); with activation checkpointing "
                  f"**{row['memory_checkpointed_vs_clip']:.2f}x** "
                  f"({verdict(row['memory_checkpointed_vs_clip'], GOALS['memory_checkpointed'])}) at "
                  f"**{row['time_checkpointed_vs_harmony']:.2f}x** the time of the step without it "
                  f"({verdict(row['time_checkpointed_vs_harmony'], GOALS['time_checkpointed'])}).", ""]
    return lines + ["![step](docs/benchmarks/step.png)", ""] + section_methods(result.get("methods", {}))


def section_methods(methods):
    """Each method's step (its preset's objectives and crops) against CLIP's at the same shape."""
    if not methods:
        return []
    shapes = list(methods)
    lines = ["## Each method's step against CLIP's (forward + backward of every objective, teachers included)", "",
             "| method | " + " | ".join(f"{shape}: time, activation memory" for shape in shapes) + " |",
             "|---|" + "---:|" * len(shapes)]
    for method in methods[shapes[0]]:
        cells = [f"{methods[shape][method]['time_vs_clip']:.2f}x, {methods[shape][method]['memory_vs_clip']:.2f}x"
                 if method in methods[shape] else "-" for shape in shapes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    batches = ", ".join(f"{shape}: batch {next(iter(runs.values()))['batch']}" for shape, runs in methods.items())
    return lines + ["", f"Presets `<method>/demo` at the demo shape, `<method>/cc3m` with a ViT-S/16 ({batches}).", ""]


def section_communication(result):
    sent = "; ".join(f"{name}: {value / 2**10:.1f} KiB"
                     for name, value in result["bytes_sent_per_rank_per_step"].items())
    return ["## Communication per step", "",
            f"{result['world_size']} gloo ranks, `{result['preset']}` preset, model gradients "
            f"{result['model_gradient_bytes'] / 2**20:.1f} MiB.", "",
            f"- Gradient bytes all-reduced per step / model gradient bytes = "
            f"**{result['gradient_bytes_all_reduced_vs_model_gradient_bytes']:.2f}x** "
            f"({verdict(result['gradient_bytes_all_reduced_vs_model_gradient_bytes'], GOALS['communication'])}; "
            f"the official code's DDP all-reduce after each of its {len(result['groups'])} backward passes gives "
            f"{result['official_ddp_per_backward_vs_model_gradient_bytes']}x).",
            f"- Everything else sent = {result['other_bytes_vs_model_gradient_bytes']:.4f}x ({sent}).", "",
            "![communication](docs/benchmarks/communication.png)", ""]


def section_scale(result):
    large, small = result["two_processes"], result["small"]
    growth = result["heap_growth_bytes_per_sample"]
    growth_verdict = verdict(growth, GOALS["rss_bytes_per_sample"]).replace("x:", " bytes:")
    return [
        "## make shards and the loader at scale", "",
        f"Generated CC3M-like raw shards in img2dataset's format: {result['url_list_rows']} url-list rows, "
        f"{large['samples_in_raw']} downloaded samples (JPEGs of {result['mean_jpeg_bytes'] / 1024:.0f} KB on "
        f"average, {result['raw_bytes'] / 2**30:.2f} GiB), a few percent broken, empty or duplicate.", "",
        f"- `make shards`: {result['samples_per_s_per_core_1_process']:.0f} samples/s per core on 1 process, "
        f"{result['samples_per_s_per_core_2_processes']:.0f} per core on 2 (start-up included). Near-duplicate "
        f"removal (perceptual hashes in pass 1, the pair search in pass 2) makes it "
        f"**{result['near_duplicates_time_ratio']:.2f}x** the time of the same build without it "
        f"({verdict(result['near_duplicates_time_ratio'], GOALS['dedup_time'])}).",
        f"- Memory: the main process's heap peak (tracemalloc: what it holds for the data) grows by **{growth:.0f} "
        f"bytes per sample** between {small['samples_in_raw']} and {large['samples_in_raw']} samples "
        f"({growth_verdict}). Its peak RSS is {large['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({small['peak_rss_bytes'] / 2**20:.0f} MiB at {small['samples_in_raw']} samples: "
        f"{result['rss_growth_bytes_per_sample']:.0f} bytes per sample, within the tens of MB that RSS varies by "
        f"from run to run), a worker's {large['peak_worker_rss_bytes'] / 2**20:.0f} MiB (one raw shard at a time).",
        f"- Disk: the output folder's peak during the build = **{result['peak_output_vs_final_shards']:.2f}x** the "
        f"final training shards ({verdict(result['peak_output_vs_final_shards'], GOALS['output_peak'])}); "
        f"{result['left_in_output_vs_final_shards']:.3f}x is left after the build (records and indexes).",
        f"- One loader epoch over the result (DALI, CPU threads, SingleCrop 224 px): "
        f"{result['loader_epoch']['samples_per_s']:.0f} samples/s, peak RSS "
        f"{result['loader_epoch']['peak_rss_bytes'] / 2**20:.0f} MiB.", "",
        "![scale](docs/benchmarks/scale.png)", ""]


def section_near_duplicates(result):
    recall = ", ".join(f"{kind} **{value:.3f}**" for kind, value in result["recall"].items())
    return ["## Near duplicates", "",
            f"A generated quality set: {result['originals']} photo-like originals, each re-encoded (JPEG 50-95), "
            "resized (0.5x-2x), cropped (up to 10%), brightness-shifted (0.7x-1.3x) and with a small text overlay, "
            f"plus {result['originals']} unrelated images of the same colours ({result['images']} in all), built by "
            f"`make shards` on {result['processes']} processes (near_duplicate_bits "
            f"{result['near_duplicate_bits']}).", "",
            f"- Recall (the variants dropped as copies of their original): {recall}; goal >= 0.95 for re-encoded "
            "and resized copies.",
            f"- Precision (dropped samples that match an image of their own group): **{result['precision']:.3f}** "
            f"of {result['dropped_as_near_duplicates']} (goal >= 0.99).",
            f"- Time: {result['time_with_vs_without']:.2f}x the same build without near-duplicate removal (small "
            "images and start-up dominate here; the scale section above measures it on CC3M-like data).", "",
            "![near duplicates](docs/benchmarks/near_duplicates.png)", ""]


def section_spark_shards(result):
    lines = ["## make shards on Spark (local mode)", "",
             f"`make shards DISTRIBUTOR=pyspark` in Spark's local mode on this machine, each build in a fresh output "
             f"folder ({result['samples_per_shard']} samples per shard), beside the local build on the same cores; "
             f"the generated set is {result['url_list_rows_generated']} url-list rows of CC3M-like shards "
             "(tools/bench/scale.py). Every build of a set gave the same shards (sha256). Seconds leave out the Spark "
             "session's start-up; shuffle bytes are Spark's stage metrics (shuffleWriteBytes). docs/spark.md "
             "extrapolates to LAION-400M from these figures.", "",
             "| set | samples | Spark local[1] | Spark local[2] | 2 cores vs 1 | local build, 1 / 2 processes | "
             "shuffle written per sample |", "|---|---|---|---|---|---|---|"]
    for name, measured in result["sets"].items():
        one, two = measured["spark"]
        local_one, local_two = measured["local"]
        lines.append(f"| {name} | {measured['samples_in_raw']} | {one['seconds']:.1f} s | {two['seconds']:.1f} s | "
                     f"{measured['spark_2_cores_vs_1']:.2f}x | {local_one['seconds']:.1f} / "
                     f"{local_two['seconds']:.1f} s | {two['shuffle_write_bytes_per_sample']:.0f} bytes |")
    one, two = result["sets"]["generated"]["spark"]
    lines += ["", "Per step on the generated set:", "", "| step | local[1] | local[2] | shuffle written (local[2]) |",
              "|---|---|---|---|"]
    for step, seconds in two["step_seconds"].items():
        lines.append(f"| {step} | {one['step_seconds'].get(step, 0):.1f} s | {seconds:.1f} s | "
                     f"{two['shuffle_write_bytes'].get(step, 0) / 2**20:.2f} MiB |")
    return lines + ["", "![spark shards](docs/benchmarks/spark_shards.png)", ""]


SECTIONS = (("shards", section_shards), ("scale", section_scale), ("near_duplicates", section_near_duplicates),
            ("spark_shards", section_spark_shards),
            ("datapipe", section_datapipe), ("remote_shards", section_remote_shards),
            ("backward_memory", section_memory), ("step", section_step),
            ("communication", section_communication))


def report(results_dir, out_path, charts_dir):
    results_dir, out_path, charts_dir = Path(results_dir), Path(out_path), Path(charts_dir)
    found = [(name, section) for name, section in SECTIONS if (results_dir / f"{name}.json").is_file()]
    if not found:
        raise SystemExit(f"error: no benchmark results in {results_dir}; run `make bench` first")
    about = machine()
    lines = ["# Benchmarks", "",
             "Written by `make bench` (tools/bench/report.py) from runs/bench/*.json. Every figure is a ratio of "
             "two measurements taken side by side in one run on the machine below.", "",
             f"- Machine: {about['cpu']}, {about['cores']} cores, GPU: {about['gpu']}; {about['platform']}, "
             f"Python {about['python']}.",
             "- Versions: " + ", ".join(f"{package} {version}" for package, version in about["versions"].items()) + ".",
             ""]
    charts_dir.mkdir(parents=True, exist_ok=True)
    for name, section in found:
        lines += section(json.loads((results_dir / f"{name}.json").read_text()))
        chart = results_dir / f"{name}.png"
        if chart.is_file():
            shutil.copyfile(chart, charts_dir / chart.name)
    lines += gpu_sections()
    out_path.write_text("\n".join(lines))
    return [name for name, _ in found]


def gpu_sections():
    """A section for each recorded GPU check (docs/benchmarks/gpu/*.json): measured there, not by make bench."""
    sections = [markdown(json.loads(path.read_text())) for path in sorted(GPU_RESULTS_DIR.glob("*.json"))]
    charts = [f"![{path.stem}](docs/benchmarks/gpu/{path.name})" for path in sorted(GPU_RESULTS_DIR.glob("*.png"))]
    return sections + (["\n".join(charts) + "\n"] if charts else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs/bench")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--charts", default="docs/benchmarks")
    args = parser.parse_args(argv)
    sections = report(args.results, args.out, args.charts)
    print(f"bench report: {', '.join(sections)} written to {args.out} (charts in {args.charts})")


if __name__ == "__main__":
    main()
