"""Where a training step's time goes: a few steps of a preset under torch.profiler, summarised (issue 36).

For each preset (the GPU check's: the ViT-B/16 Harmony and CLIP presets at their own per-GPU batch; with --tiny
at the smallest sizes, on this CPU), the trainer's own step (train.pretrain.Trainer.train_step) runs on batches of
the shards in --data, read before the profiled steps so that no data wait is counted. After `warmup` steps,
`steps` steps run under torch.profiler. The summary of each preset:

- `step_ms`: wall time per step, from the host's first launch to the end of the device's last kernel;
- `device_idle_fraction`: the share of that time in which no kernel or copy runs on the device;
- `kernels_per_step`, `copies_per_step` (memcpy and memset);
- `host_syncs_per_step`: the calls that make the host wait for the device (`sync_calls_per_step` by name:
  cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, aten::item, aten::_local_scalar_dense,
  device-to-host copies);
- `top_kernels`: the kernels with the most device time, with their calls and share of the device's busy time;
- `parts`: host and device milliseconds per step of each range the trainer names ("teachers forward",
  "<objective> forward", "<objective> backward"), and `other` for the rest of the step (gradient averaging,
  clipping, the optimizer, the EMA).

On a CPU there is no device: the "kernels" are the outermost aten ops of every thread and the host syncs are the
calls that read a scalar (each would wait on a GPU), so the same code paths give the CPU's figures (the tests'
check). Writes <out>/profile.json and, per preset, <out>/<preset, / as _>.trace.json.gz: the chrome trace of the last
profiled step (open it in Perfetto or chrome://tracing).

    python -m tools.gpu.profile --presets harmony/cc3m clip/cc3m --data shards/demo/train --out runs/profile
    python -m tools.gpu.profile --tiny --presets harmony/demo clip/demo --data shards/demo/train --out runs/profile
"""

import argparse
import bisect
import gc
import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

from tools.gpu.check import trace_name
from train.config import enabled_settings_overrides, load_config
from train.distributed import World
from train.pretrain import Trainer

GPU_OVERRIDES = ("data.backend=dali", "run.precision=bf16")
TINY_OVERRIDES = (  # the demo's micro ViT, the towers at their smallest, 32 px crops (tools.bench.step's tiny)
    "data.batch_size=4", "data.backend=torch", "data.num_workers=0", "run.precision=fp32", "data.global_crop_px=32",
    "data.local_crop_px=16", "data.local_crops_number=2", "model.global_crop_px=32", "model.clip_dim=32",
    "model.text_width=64", "model.text_layers=2", "model.text_heads=4")
TINY_SETTINGS = {  # each objective's parts at their smallest, where the preset enables it
    "ibot": {"out_dim": 64, "head_hidden_dim": 64, "bottleneck_dim": 16},
    "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
    "masked_text": {"distillation_out_dim": 32, "distillation_head_hidden_dim": 32, "bottleneck_dim": 16,
                    "mlm_decoder_depth": 1, "mlm_decoder_heads": 2},
}

STEP_RANGE = "profiled step"
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
              "aten::_local_scalar_dense")
WAITING_CALLS = {"cuda": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
                 "cpu": ("aten::_local_scalar_dense",)}  # one per wait: aten::item calls _local_scalar_dense
TOP_KERNELS = 12


def tiny_overrides(preset):
    """TINY_OVERRIDES and the TINY_SETTINGS of the objectives `preset` enables."""
    return [*TINY_OVERRIDES, *enabled_settings_overrides(preset, TINY_SETTINGS)]


def profile_preset(preset, shards, device, overrides=(), warmup=2, steps=3, trace_path=None):
    """The summary (module docstring) of `steps` training steps of `preset` on `device`, after `warmup` steps."""
    config = load_config(preset, [f"data.shards={shards}", *overrides])
    trainer = Trainer(config, World(0, 1, 0, device))
    batches = first_batches(trainer.loader, warmup + steps)
    for step in range(warmup):
        train_step(trainer, batches[step % len(batches)])
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for step in range(warmup, warmup + steps):
            with record_step():
                train_step(trainer, batches[step % len(batches)])
        synchronize(device)
    events = list(profiler.events())
    if trace_path:
        write_last_step_trace(profiler, trace_path)
    summary = summarise(events, steps, device.type)
    return dict(preset=preset, batch_size=config.data.batch_size, precision=config.run.precision,
                objectives=list(trainer.model.backward_groups), steps=steps, **summary)


def first_batches(loader, count):
    """Up to `count` batches from the start of the loader's epoch (fewer if the epoch is shorter: steps reuse
    them in turn)."""
    iterator = iter(loader)
    batches = [batch for _, batch in zip(range(min(count, len(loader))), iterator, strict=False)]
    iterator.close()  # stops the backend's workers or pipeline
    return batches


def train_step(trainer, batch):
    trainer.train_step(batch, trainer.schedules.at(trainer.step))


def record_step():
    return torch.profiler.record_function(STEP_RANGE)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_last_step_trace(profiler, path):
    """The chrome trace, cut to the events of the last profiled step, gzip'd."""
    path = Path(path)
    raw = path.with_suffix("")  # <preset>.trace.json
    profiler.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    steps = [event for event in trace.get("traceEvents", []) if event.get("name") == STEP_RANGE]
    if steps:
        start = max(event["ts"] for event in steps)
        trace["traceEvents"] = [event for event in trace["traceEvents"] if event.get("ph") == "M" or
                                float(event.get("ts", start)) >= start]
    with gzip.open(path, "wt") as file:
        json.dump(trace, file)
    raw.unlink()


def summarise(events, steps, device_type):
    """The per-step figures of profiled events (FunctionEvents of `steps` steps, each inside a STEP_RANGE)."""
    step_ranges = [event for event in events if event.name == STEP_RANGE]
    start, host_end = min(event.time_range.start for event in step_ranges), \
        max(event.time_range.end for event in step_ranges)
    within = [event for event in events if event.device_type == DeviceType.CPU and
              start <= event.time_range.start < host_end]
    if device_type == "cuda":
        activity = [(event.name, event.time_range.start, event.time_range.end) for event in events
                    if event.device_type == DeviceType.CUDA and not event.is_user_annotation and
                    not is_range(event.name)]  # kernels and copies, not the ranges' shadows on the device
        launches = [(event.time_range.start, kernel.duration) for event in within for kernel in event.kernels]
    else:
        outermost = [event for event in within if event.name.startswith("aten::") and not has_aten_parent(event)]
        activity = [(event.name, event.time_range.start, event.time_range.end) for event in outermost]
        launches = [(event.time_range.start, event.time_range.elapsed_us()) for event in outermost]
    end = max([host_end, *(finish for _, _, finish in activity)])
    span_us, busy_us = end - start, union_us([(begin, finish) for _, begin, finish in activity])
    copies = [name for name, _, _ in activity if name.startswith(("Memcpy", "Memset"))]
    sync_calls = Counter(event.name for event in within if event.name in SYNC_CALLS)
    sync_calls.update("Memcpy DtoH" for name in copies if "DtoH" in name)
    return dict(step_ms=span_us / steps / 1e3, device_idle_fraction=max(0.0, 1.0 - busy_us / span_us),
                device_busy_ms_per_step=busy_us / steps / 1e3,
                kernels_per_step=(len(activity) - len(copies)) / steps, copies_per_step=len(copies) / steps,
                host_syncs_per_step=sum(sync_calls[name] for name in WAITING_CALLS[device_type]) / steps,
                sync_calls_per_step={name: count / steps for name, count in sorted(sync_calls.items())},
                top_kernels=top_kernels(activity, steps, busy_us),
                parts=parts(within, launches, steps, span_us))


def is_range(name):
    """A profiler range of the trainer's (or this module's step)."""
    return name == STEP_RANGE or name.endswith((" forward", " backward")) and not name.startswith(("aten::",
                                                                                                  "autograd"))


def has_aten_parent(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def union_us(intervals):
    """Microseconds covered by at least one (start, end) interval."""
    covered, reach = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        if finish > reach:
            covered += finish - max(begin, reach)
            reach = finish
    return covered


def top_kernels(activity, steps, busy_us):
    """[{name, ms_per_step, calls_per_step, share of device busy time}] of the kernels with the most time."""
    time_us, calls = defaultdict(float), Counter()
    for name, begin, finish in activity:
        time_us[name] += finish - begin
        calls[name] += 1
    ranked = sorted(time_us, key=time_us.get, reverse=True)[:TOP_KERNELS]
    return [dict(name=name, ms_per_step=time_us[name] / steps / 1e3, calls_per_step=calls[name] / steps,
                 share=time_us[name] / busy_us if busy_us else 0.0) for name in ranked]


def parts(within, launches, steps, span_us):
    """{range: {host_ms, device_ms}} per step for the trainer's named ranges, and `other` for the rest: device
    time is that of the kernels launched (from any thread: backward runs on autograd's) inside the range."""
    launches.sort()
    starts = [launch for launch, _ in launches]
    cumulative = [0.0]
    for _, duration in launches:
        cumulative.append(cumulative[-1] + duration)
    host_us, device_us = defaultdict(float), defaultdict(float)
    for event in within:
        if is_range(event.name) and event.name != STEP_RANGE:
            begin, finish = event.time_range.start, event.time_range.end
            host_us[event.name] += finish - begin
            device_us[event.name] += cumulative[bisect.bisect_left(starts, finish)] - \
                cumulative[bisect.bisect_left(starts, begin)]
    named = {name: dict(host_ms=host_us[name] / steps / 1e3, device_ms=device_us[name] / steps / 1e3)
             for name in host_us}
    named["other"] = dict(host_ms=max(0.0, span_us - sum(host_us.values())) / steps / 1e3,
                          device_ms=max(0.0, cumulative[-1] - sum(device_us.values())) / steps / 1e3)
    return named


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder of training shards (make shards' train/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", nargs="+", required=True, help="train/configs presets, e.g. harmony/cc3m")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the micro model on this CPU (the tests)")
    args = parser.parse_args(argv)
    device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda", 0)
    if not args.tiny and device.type != "cuda":
        sys.exit("error: profiling at the presets' sizes needs a CUDA device; use --tiny to try it on this CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", presets={})
    failed = []
    for preset in args.presets:
        try:
            overrides = tiny_overrides(preset) if args.tiny else GPU_OVERRIDES
            summary = profile_preset(preset, args.data.resolve(), device, overrides, args.warmup, args.steps,
                                     args.out / trace_name(preset))
        except (RuntimeError, ValueError) as error:  # out of memory, say: the next preset still runs
            summary, failed = dict(error=f"{type(error).__name__}: {str(error)[:2000]}"), [*failed, preset]
            print(f"{preset}: {summary['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{preset}: {summary['step_ms']:.1f} ms per step, device idle "
                  f"{summary['device_idle_fraction']:.1%}, {summary['kernels_per_step']:.0f} kernels and "
                  f"{summary['host_syncs_per_step']:.1f} host syncs per step", flush=True)
        report["presets"][preset] = summary
        (args.out / "profile.json").write_text(json.dumps(report, indent=2))  # what is done so far
        gc.collect()  # the preset's model and batches, before the next one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
