"""The GPU check's figures as a markdown section for BENCHMARKS.md, each set against its goal (issues 26 and 36),
and where the step's time goes (the profile stage)."""


def stage_figures(results, stage):
    return results["stages"].get(stage, {}).get("figures") or {}


def vit_b(results, stage="bench_step"):
    """The ViT-B/16 shape's figures of a step benchmark stage ({} if it did not run)."""
    shapes = stage_figures(results, stage).get("shapes", {})
    return next((shape for name, shape in shapes.items() if name.startswith("ViT-B")), {})


GOALS = (  # (label, figure of the results or None, comparison, goal, format)
    ("DALI GPU multi-crop (2 x 224 + 8 x 96 px, masks), samples/s",
     lambda results: stage_figures(results, "bench_data").get("dali_gpu_samples_per_s"), ">=", 5000, "{:.0f}"),
    ("MFU of a Harmony ViT-B/16 bf16 step, batch 96",
     lambda results: vit_b(results).get("runs", {}).get("harmony", {}).get("model_flops_utilisation"),
     ">=", 0.35, "{:.1%}"),
    ("Harmony / CLIP-only memory, GPU allocator (max_memory_allocated)",
     lambda results: vit_b(results).get("max_memory_allocated_harmony_vs_clip"), "<=", 1.8, "{:.2f}x"),
    ("data-wait fraction, demo preset trained on DALI GPU",
     lambda results: stage_figures(results, "train").get("data_wait_fraction"), "<", 0.02, "{:.1%}"),
)


def met(value, comparison, goal):
    return {">=": value >= goal, "<=": value <= goal, "<": value < goal}[comparison]


def step_rows(results, stage):
    rows = []
    for shape_name, shape in stage_figures(results, stage).get("shapes", {}).items():
        for run_name, run in shape["runs"].items():
            if run["images_per_s"] is None:
                continue
            mfu = run.get("model_flops_utilisation")
            allocated = run.get("max_memory_allocated_bytes")
            rows.append(f"| {stage} | {shape_name} | {run_name} | {run['images_per_s']:.0f} | "
                        f"{'-' if mfu is None else f'{mfu:.1%}'} | "
                        f"{'-' if allocated is None else f'{allocated / 2**30:.1f}'} | "
                        f"{run['activation_peak_bytes'] / 2**30:.2f} |")
    return rows


def markdown(results):
    environment = results.get("environment", {})
    versions = ", ".join(f"{name} {version}" for name, version in environment.get("versions", {}).items())
    command = "make gpu-check" + (f" --only {' '.join(results['only'])}" if results.get("only") else "")
    lines = [f"## On a GPU: {environment.get('device', '?')} (`{command}`, {results['started']})", "",
             f"Driver {environment.get('driver')}, CUDA {environment.get('cuda_runtime')}, Python "
             f"{environment.get('python')}, {environment.get('cpu_count')} CPU cores; {versions}.", "",
             "| figure | measured | goal | met |", "|---|---|---|---|"]
    for label, read, comparison, goal, number_format in GOALS:
        value = read(results)
        shown = "not measured" if value is None else number_format.format(value)
        verdict = "" if value is None else ("yes" if met(value, comparison, goal) else "**no**")
        lines.append(f"| {label} | {shown} | {comparison} {number_format.format(goal)} | {verdict} |")
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {entry['status']} | {entry['seconds']:.0f} |" for name, entry in results["stages"].items()]
    tests = results["stages"].get("tests", {})
    if tests.get("summary"):
        lines += ["", f"Tests on the device: {tests['summary']}."] + [f"- {line}" for line in tests.get("failed", [])]
    data = stage_figures(results, "bench_data")
    if data:
        lines += ["", f"Multi-crop samples/s: DALI GPU {data.get('dali_gpu_samples_per_s')}, DALI CPU "
                      f"{data.get('dali_cpu_samples_per_s')} and torch reference "
                      f"{data.get('torch_reference_samples_per_s')} "
                      f"({data.get('workers_or_threads')} threads/workers)."]
    rows = step_rows(results, "bench_step") + step_rows(results, "bench_step_compiled")
    if rows:
        lines += ["", "| stage | shape | run | images/s | MFU | max allocated GiB | activation peak GiB |",
                  "|---|---|---|---|---|---|---|", *rows]
    lines += profile_lines(stage_figures(results, "profile"))
    return "\n".join(lines) + "\n"


def profile_lines(profile):
    """The profile stage's tables: per preset the step's figures, then its parts and its top kernels."""
    presets = profile.get("presets", {})
    if not presets:
        return []
    lines = ["", f"Where the step's time goes (tools/gpu/profile.py on {profile.get('device')}):", "",
             "| preset | batch | step ms | device idle | kernels / step | copies / step | host syncs / step |",
             "|---|---|---|---|---|---|---|"]
    for name, summary in presets.items():
        if "error" in summary:
            lines.append(f"| {name} | {summary['error'][:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {summary['batch_size']} | {summary['step_ms']:.1f} | "
                     f"{summary['device_idle_fraction']:.1%} | {summary['kernels_per_step']:.0f} | "
                     f"{summary['copies_per_step']:.0f} | {summary['host_syncs_per_step']:.1f} |")
    for name, summary in presets.items():
        if "error" in summary:
            continue
        syncs = ", ".join(f"{call} {count:g}" for call, count in summary["sync_calls_per_step"].items()) or "none"
        lines += ["", f"{name}: host syncs per step by call: {syncs}.", "",
                  "| part | host ms / step | device ms / step |", "|---|---|---|"]
        lines += [f"| {part} | {times['host_ms']:.1f} | {times['device_ms']:.1f} |"
                  for part, times in summary["parts"].items()]
        lines += ["", "| kernel | device ms / step | calls / step | share of device time |", "|---|---|---|---|"]
        lines += [f"| `{kernel['name'][:90]}` | {kernel['ms_per_step']:.2f} | {kernel['calls_per_step']:g} | "
                  f"{kernel['share']:.1%} |" for kernel in summary["top_kernels"]]
    return lines
