"""The GPU check's profile stage (tools/gpu/profile.py) at tiny size on the CPU: every figure is there and sane,
and every part of the step the trainer names is timed."""

import gzip
import json

import pytest
import torch

from tools.gpu import profile
from tools.gpu.report import markdown


@pytest.fixture(scope="module")
def harmony_summary(demo_shards, tmp_path_factory):
    trace = tmp_path_factory.mktemp("profile") / "demo.trace.json.gz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads would only wait on each other
    try:
        summary = profile.profile_preset("harmony/demo", demo_shards["train"], torch.device("cpu"),
                                         profile.TINY_OVERRIDES, warmup=0, steps=2, trace_path=trace)
    finally:
        torch.set_num_threads(threads)
    return summary, trace


def test_the_profile_times_every_pass_of_every_objective_and_the_rest(harmony_summary):
    summary, _ = harmony_summary
    assert summary["objectives"] == ["ibot", "clip", "masked_text", "mae"]
    expected = {"teachers forward", "other", *(f"{objective} {direction}" for objective in summary["objectives"]
                                               for direction in ("forward", "backward"))}
    assert set(summary["parts"]) == expected
    for name, part in summary["parts"].items():
        assert part["host_ms"] > 0 and part["device_ms"] >= 0, name
    assert sum(part["host_ms"] for part in summary["parts"].values()) == pytest.approx(summary["step_ms"], rel=0.01)


def test_the_profile_figures_are_sane(harmony_summary):
    summary, trace = harmony_summary
    assert summary["steps"] == 2 and summary["step_ms"] > 0
    assert 0 <= summary["device_idle_fraction"] <= 1
    assert 0 < summary["device_busy_ms_per_step"] <= summary["step_ms"]
    assert summary["kernels_per_step"] > 0 and summary["copies_per_step"] >= 0
    assert summary["host_syncs_per_step"] >= 0
    assert all(count >= 0 for count in summary["sync_calls_per_step"].values())
    kernels = summary["top_kernels"]
    assert 0 < len(kernels) <= profile.TOP_KERNELS
    assert [kernel["ms_per_step"] for kernel in kernels] == sorted((kernel["ms_per_step"] for kernel in kernels),
                                                                   reverse=True)
    assert all(0 < kernel["share"] <= 1 and kernel["calls_per_step"] > 0 for kernel in kernels)
    with gzip.open(trace, "rt") as file:  # the last step's chrome trace
        names = {event.get("name") for event in json.load(file)["traceEvents"]}
    assert {profile.STEP_RANGE, "ibot backward"} <= names


def test_overlapping_device_activity_is_counted_once():
    assert profile.union_us([(0, 10), (5, 12), (20, 30), (21, 22)]) == 22


def test_the_gpu_checks_report_shows_the_profile(harmony_summary):
    summary, _ = harmony_summary
    results = dict(started="now", stages={"profile": dict(status="ok", seconds=1.0, figures=dict(
        device="cpu", presets={"harmony/demo": summary,
                               "clip/cc3m": dict(error="OutOfMemoryError: CUDA out of memory")}))})
    report = markdown(results)
    assert "| harmony/demo | 4 | " in report and "| clip/cc3m | OutOfMemoryError" in report
    assert "| ibot backward | " in report and f"| `{summary['top_kernels'][0]['name']}` |" in report
