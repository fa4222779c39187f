"""`make gpu-check`: on the GPU machine, install the kit, then validate and measure everything, stage by stage.

Stops at once without a CUDA device. Otherwise: joins the received parts (python3 -m tools.gpu.receive), checks every
sha256, installs the wheels into /tmp/harmony-gpu-site without network, then runs each stage as its own process
under a time budget (the whole about 8 minutes): the GPU-marked tests, then the model, loss, loader and trainer
tests on the device; the demo preset trained a few hundred steps fed by DALI on the GPU (data-wait fraction), and its
zero-shot; DALI GPU multi-crop against DALI on the CPU cores and the torch reference; a Harmony and a CLIP-only
ViT-B/16 step in bf16 at batch 96, with and without activation checkpointing; a few trainer steps of the ViT-B/16
Harmony and CLIP presets under torch.profiler (tools/gpu/profile.py: where the step's time goes, device idle,
kernels and host syncs per step); then the step with torch.compile. A stage
that fails or overruns is recorded as such and the next one runs. After every stage, the figures so far are
written to <out>/results.json and <out>/gpu-benchmarks.md (a section for BENCHMARKS.md), with the device,
driver and the versions used; every stage's output goes to <out>/check.log.

    make gpu-check OUT_DIR="$OUT"                       # on the GPU machine, after the parts
    python -m tools.gpu.check --tiny --data DIR --out DIR   # the same stages on this CPU at tiny sizes (tests)
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu import parts
from tools.gpu.report import markdown

REPOSITORY = Path(__file__).resolve().parents[2]
LARGER_SET = "2000x250"  # the tests' larger demo set (demo/end_to_end.py): the training and benchmark data
PROFILED_PRESETS = ("harmony/cc3m", "clip/cc3m")  # Harmony and CLIP, ViT-B/16, each at its per-GPU batch (96, 512)
TINY_PROFILED_PRESETS = ("harmony/demo", "clip/demo")  # tools.gpu.profile --tiny shrinks them further
TEST_FILES = ("tests/test_model.py", "tests/test_losses.py", "tests/test_harmony.py", "tests/test_loader.py",
              "tests/test_train.py")


def trace_name(preset):
    """The file tools.gpu.profile writes a preset's trace to (harmony/cc3m -> harmony_cc3m.trace.json.gz)."""
    return f"{preset.replace('/', '_')}.trace.json.gz"


@dataclass
class Stage:
    name: str
    budget_s: int
    argv: list
    figures: object = None  # () -> dict of figures, read after the stage ends (also after an overrun)
    files: dict = field(default_factory=dict)  # work-relative path -> name to copy into the output folder
    clears: tuple = ()  # removed before the stage runs: a re-run on the same machine never reads the last one's


def pytest_figures(log_text):
    """The pytest summary line and the failed tests, from the stage's output."""
    lines = log_text.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and
                    any(word in line for word in ("passed", "failed", "skipped", "error"))), None)
    return dict(summary=summary, failed=[line for line in lines if line.startswith(("FAILED", "ERROR"))][:40])


def training_figures(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [row for row in rows if "data_wait_fraction" in row]
    steady = logged[1:] or logged  # the first window holds the pipeline's start-up
    figures = dict(steps=rows[-1]["step"] if rows else 0,
                   data_wait_fraction=sum(row["data_wait_fraction"] for row in steady) / max(len(steady), 1),
                   images_per_s=sum(row["images_per_s"] for row in steady) / max(len(steady), 1),
                   first_loss=next((row["loss"] for row in rows if "loss" in row), None),
                   last_loss=next((row["loss"] for row in reversed(rows) if "loss" in row), None))
    if logged and "peak_memory_bytes" in logged[-1]:
        figures["peak_memory_bytes"] = logged[-1]["peak_memory_bytes"]
    return figures


def multicrop_figures(path):
    """tools.bench.datapipe's MultiCrop figures (DALI GPU and CPU, torch reference) and its worker count."""
    report = json.loads(path.read_text())
    return {**report["recipes"]["MultiCrop"], "workers_or_threads": report["workers_or_threads"]}


def step_figures(path):
    """The figures of tools.bench.step's JSON that the goals read, per shape."""
    report = json.loads(path.read_text())
    shapes = {}
    for result in report["results"]:
        runs = {name: {key: run.get(key) for key in ("images_per_s", "step_s", "model_flops_utilisation",
                                                       "max_memory_allocated_bytes", "activation_peak_bytes")}
                for name, run in result.items() if isinstance(run, dict) and "step_s" in run}
        shapes[result["shape"]] = dict(runs=runs, **{key: result.get(key) for key in (
            "time_harmony_vs_clip", "flops_harmony_vs_clip", "memory_harmony_vs_clip",
            "max_memory_allocated_harmony_vs_clip", "memory_checkpointed_vs_clip", "time_checkpointed_vs_harmony")})
    return dict(device=report["device"], peak_tflops=report["peak_tflops"], compile=report.get("compile"),
                shapes=shapes)


def profile_figures(path):
    """tools.gpu.profile's summary of each preset."""
    return json.loads(path.read_text())


def stages(python, data_dir, work, tiny):
    """The check's stages; tiny (on a CPU, for the tests) gives each six times its budget: it checks code paths,
    not speed, often on a busy machine."""
    larger = data_dir / LARGER_SET
    budget = 6 if tiny else 1
    run_dir = work / "runs" / "gpu_demo"
    cpus = str(1 if tiny else min(os.cpu_count() or 1, 16))
    # no per-method costs (--methods with none): the GPU check measures Harmony against CLIP-only
    shape_args = ["--shapes", "tiny", "--repeats", "1"] if tiny else ["--shapes", "vit_b", "--vit-b-batch", "96",
                                                                      "--repeats", "5"]
    step_args = ["--methods", *shape_args]
    compile_args = ["--compile", "--compile-backend", "eager" if tiny else "inductor"]
    profiled = TINY_PROFILED_PRESETS if tiny else PROFILED_PRESETS
    return [
        Stage("gpu_tests", 60 * budget, [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                         *(("tests/test_model.py",) if tiny else TEST_FILES)]),
        Stage("tests", 80 * budget, [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                                     "-m", "not gpu and not slow",
                                     *(("tests/test_model.py", "-k", "mae_keeps") if tiny else TEST_FILES)]),
        Stage("train", 80 * budget, [python, "-m", "train.pretrain", "--config", "harmony/demo",
                                     f"data.shards={larger / 'train'}", "data.backend=dali",
                                     f"data.num_workers={cpus}", f"run.out_dir={run_dir.parent}",
                                     f"run.name={run_dir.name}", f"run.max_steps={3 if tiny else 200}",
                                     f"run.log_every={1 if tiny else 20}",
                                     f"run.precision={'fp32' if tiny else 'bf16'}"],
              figures=lambda: training_figures(run_dir), files={"runs/gpu_demo/plots/losses.png": "train-losses.png"},
              clears=(run_dir,)),
        Stage("zeroshot", 25 * budget, [python, "-m", "evaluation.run", "--run", str(run_dir), "--zeroshot",
                                        str(larger / "source" / "heldout")],
              figures=lambda: json.loads((run_dir / "eval.json").read_text()), clears=(run_dir / "eval.json",)),
        Stage("bench_data", 60 * budget, [python, "-m", "tools.bench.datapipe", "--shards", str(larger / "train"),
                                          "--recipes", "MultiCrop", "--workers", cpus, "--out", str(work / "bench"),
                                          *(("--batch-size", "8", "--batches", "2") if tiny else ("--batches", "90"))],
              figures=lambda: multicrop_figures(work / "bench" / "datapipe.json"),
              files={"bench/datapipe.png": "datapipe.png"}, clears=(work / "bench" / "datapipe.json",)),
        Stage("bench_step", 90 * budget, [python, "-m", "tools.bench.step", *step_args, "--out", str(work / "bench")],
              figures=lambda: step_figures(work / "bench" / "step.json"), files={"bench/step.png": "step.png"},
              clears=(work / "bench" / "step.json",)),
        Stage("profile", 120 * budget, [python, "-m", "tools.gpu.profile", "--data", str(larger / "train"),
                                        "--presets", *profiled, "--out", str(work / "profile"),
                                        *(("--tiny",) if tiny else ())],
              figures=lambda: profile_figures(work / "profile" / "profile.json"),
              files={f"profile/{trace_name(preset)}": f"profile-{trace_name(preset)}" for preset in profiled},
              clears=(work / "profile",)),
        Stage("bench_step_compiled", 100 * budget, [python, "-m", "tools.bench.step", *step_args, *compile_args,
                                                    "--out", str(work / "bench")],
              figures=lambda: step_figures(work / "bench" / "step_compiled.json"),
              clears=(work / "bench" / "step_compiled.json",)),
    ]


def run_stage(stage, env, log):
    """(status, seconds, output): the stage's process under its budget; on overrun its whole process group
    is stopped."""
    started = time.perf_counter()
    process = subprocess.Popen(stage.argv, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=stage.budget_s)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = f"overran its {stage.budget_s} s budget"
    seconds = time.perf_counter() - started
    log.write(f"\n===== {stage.name}: {status} in {seconds:.0f} s\n$ {' '.join(stage.argv)}\n{output}\n")
    log.flush()
    return status, seconds, output


def write_results(out_dir, results):
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "gpu-benchmarks.md").write_text(markdown(results))


def install_kit(kit_dir, received_dir, site_dir):
    """The kit's wheels installed into site_dir; returns (site_dir, the folder holding its demo sets)."""
    manifest = parts.load_manifest(kit_dir / parts.MANIFEST_NAME)
    unpacked = received_dir / "unpacked"
    marker = site_dir / parts.INSTALLED_MARKER
    if not (marker.is_file() and marker.read_text() == manifest["archive"]["sha256"] and (unpacked / "demo").is_dir()):
        parts.assemble(manifest, received_dir, unpacked)
    return parts.install(manifest, unpacked, site_dir), unpacked / "demo", manifest


def require_cuda():
    try:
        import torch
    except ImportError:
        sys.exit("error: make gpu-check needs PyTorch with CUDA on this machine's python3; none is importable")
    if not torch.cuda.is_available():
        sys.exit("error: make gpu-check needs an NVIDIA GPU with a CUDA driver (torch.cuda.is_available() is False "
                 f"with torch {torch.__version__}); run it on the GPU machine, or `--tiny` to try its stages here")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", type=Path, default=Path(".gpu-kit"), help="the folder holding the manifest")
    parser.add_argument("--received", type=Path, default=parts.RECEIVED_DIR)
    parser.add_argument("--site", type=Path, default=parts.SITE_DIR)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"))
    parser.add_argument("--only", nargs="+", help="run just these stages (a re-run after a fix)")
    parser.add_argument("--tiny", action="store_true", help="this machine's Python and device, tiny sizes, no kit")
    parser.add_argument("--data", type=Path, help="with --tiny: a folder of demo sets (<pairs>x<per shard>/)")
    args = parser.parse_args(argv)
    if not args.tiny:
        require_cuda()
    started = time.perf_counter()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f"{out_dir.name}-work" if args.tiny else Path("/tmp/harmony-gpu-work")
    work.mkdir(parents=True, exist_ok=True)
    results = dict(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tiny=args.tiny, only=args.only,
                   stages={})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.tiny:
        data_dir, python = args.data.resolve(), sys.executable
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    else:
        try:
            site_dir, data_dir, manifest = install_kit(args.kit, args.received, args.site)
        except parts.KitError as error:
            sys.exit(f"error: {error}")
        results["kit"] = manifest["made_with"]
        python = sys.executable
        env["PYTHONPATH"] = os.pathsep.join([str(site_dir), str(REPOSITORY)])
    env["HARMONY_PREBUILT_DEMO"] = str(data_dir)  # the tests' fixtures copy these sets (no img2dataset here)
    environment = subprocess.run([python, "-m", "tools.gpu.environment"], cwd=REPOSITORY, env=env,
                                 capture_output=True, text=True)
    results["environment"] = json.loads(environment.stdout) if environment.returncode == 0 else \
        dict(error=environment.stderr.strip()[-2000:])
    write_results(out_dir, results)
    with open(out_dir / "check.log", "a") as log:
        for stage in stages(python, data_dir, work, args.tiny):
            if args.only and stage.name not in args.only:
                continue
            print(f"gpu check: {stage.name} (budget {stage.budget_s} s) ...", flush=True)
            for path in stage.clears:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            status, seconds, output = run_stage(stage, env, log)
            entry = dict(status=status, seconds=round(seconds, 1))
            if stage.name.endswith("tests"):
                entry.update(pytest_figures(output))
            elif stage.figures:
                try:
                    entry["figures"] = stage.figures()
                except (OSError, ValueError, KeyError) as error:
                    entry["figures_error"] = f"{type(error).__name__}: {error}"
            if status != "ok":
                entry["output_tail"] = output[-3000:]
            for source, name in stage.files.items():
                if (work / source).is_file():
                    (out_dir / name).write_bytes((work / source).read_bytes())
            results["stages"][stage.name] = entry
            write_results(out_dir, results)
            print(f"gpu check: {stage.name}: {status} in {seconds:.0f} s", flush=True)
    failed = [name for name, entry in results["stages"].items() if entry["status"] != "ok"]
    print(f"gpu check done in {time.perf_counter() - started:.0f} s: {len(results['stages']) - len(failed)} of "
          f"{len(results['stages'])} stages ok{'; not ok: ' + ', '.join(failed) if failed else ''}; "
          f"results in {out_dir / 'results.json'} and gpu-benchmarks.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
