"""Benchmarks measure what they claim: gradient traffic per step, and FLOPs that follow the model's work."""

import json

import torch
from tiny_models import TINY_TOWERS

from model.meta_arch import ModelConfig
from tools.bench import communication, report, step
from tools.bench.live_bytes import LiveTensorBytes

# Harmony with tiny towers and decoders; its distillation heads' other sizes (MLP widths, bottlenecks), its MLM mask
# probability and drop path at their defaults, which the FLOPs ratios below are measured on
TINY = ModelConfig(**{**TINY_TOWERS, "drop_path_rate": 0.1}, objectives={
    "ibot": {"out_dim": 64}, "clip": {"soft_targets": True},
    "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4},
    "masked_text": {"distillation_out_dim": 32, "mlm_decoder_depth": 1, "mlm_decoder_heads": 4}})


def test_two_ranks_all_reduce_each_gradient_byte_once_per_step():
    result = communication.measure(steps=2)
    assert result["groups"] == ["ibot", "clip", "masked_text", "mae"]
    assert result["gradient_bytes_all_reduced_vs_model_gradient_bytes"] == 1.0
    sent = result["bytes_sent_per_rank_per_step"]
    assert sent["finiteness and stop check / all_reduce"] == 8  # two floats
    assert 0 < result["other_bytes_vs_model_gradient_bytes"] < 0.01  # CLIP gathers and centres


def test_step_bench_counts_more_flops_for_more_objectives_and_fewer_for_trimmed_captions():
    harmony = step.measure(TINY, batch=4, local_px=16, locals_number=2, repeats=1, device="cpu")
    clip = step.measure(step.clip_only(TINY), batch=4, local_px=16, locals_number=2,
                        repeats=1, device="cpu")
    untrimmed = step.measure(TINY, batch=4, local_px=16, locals_number=2, repeats=1, device="cpu", trim=False)
    assert set(harmony["flops_per_part"]) == {"teachers", "ibot", "clip", "masked_text", "mae"}
    assert set(clip["flops_per_part"]) == {"teachers", "clip"} and clip["flops_per_part"]["teachers"] == 0
    # CLIP-only's one group does the work of Harmony's CLIP group, less the soft targets.
    assert clip["flops_per_part"]["clip"] < harmony["flops_per_part"]["clip"] < 1.01 * clip["flops_per_part"]["clip"]
    assert harmony["step_flops"] > 3 * clip["step_flops"]
    # 21 ids: 32 of 77 columns; the MLM vocabulary projection at masked positions does not shrink.
    assert untrimmed["flops_per_part"]["masked_text"] > 1.5 * harmony["flops_per_part"]["masked_text"]
    assert untrimmed["flops_per_part"]["ibot"] == harmony["flops_per_part"]["ibot"]
    assert harmony["live_peak_bytes_per_part"].keys() == harmony["flops_per_part"].keys()
    assert min(harmony["live_peak_bytes_per_part"].values()) > 0
    assert harmony["activation_peak_bytes"] == max(harmony["live_peak_bytes_per_part"].values())


def test_live_bytes_counts_what_a_step_makes_until_it_is_freed():
    weight = torch.randn(256, 256, requires_grad=True)  # 256 KiB, made before: not counted
    weight.grad = torch.zeros_like(weight)
    with LiveTensorBytes() as memory:
        hidden = weight @ weight  # 256 KiB
        activated = hidden.relu()  # 256 KiB, saved for backward
        del hidden
        assert memory.live == 2**18
        activated.t().sum().backward()  # a view adds nothing; the gradient accumulates in place
        assert memory.peak >= 2 * 2**18
        del activated
        assert memory.live < 2**10  # only the scalar loss's leftovers
        memory.reset_peak()
        assert memory.peak == memory.live


def test_report_writes_each_measured_section_with_its_verdict_and_charts(tmp_path):
    results = tmp_path / "bench"
    results.mkdir()
    (results / "communication.json").write_text(json.dumps({
        "world_size": 2, "preset": "harmony/demo", "groups": ["ibot", "clip", "masked_text", "mae"],
        "model_gradient_bytes": 2**20,
        "bytes_sent_per_rank_per_step": {"gradient average / all_reduce": 2**20,
                                         "finiteness and stop check / all_reduce": 8},
        "gradient_bytes_all_reduced_vs_model_gradient_bytes": 1.0,
        "official_ddp_per_backward_vs_model_gradient_bytes": 4,
        "other_bytes_vs_model_gradient_bytes": 4 / 2**20}))
    (results / "communication.png").write_bytes(b"png")
    sections = report.report(results, tmp_path / "BENCHMARKS.md", tmp_path / "charts")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert sections == ["communication"] and "## make shards" not in text
    assert "**1.00x** (goal <= 1x: met" in text and "gives 4x" in text
    assert "torch " in text and (tmp_path / "charts" / "communication.png").read_bytes() == b"png"


def test_scale_bench_writes_raw_shards_make_shards_accepts(tmp_path):
    """The generated raw shards are img2dataset's format, with CC3M-sized JPEGs and a few bad samples."""
    from datapipe import shards
    from tools.bench import scale

    raw = tmp_path / "raw"
    raw.mkdir()
    scale.write_raw_shard(raw, 0, 300, seed=1)
    stats = json.loads((raw / "00000_stats.json").read_text())
    assert stats["count"] == 300 and 0.7 < stats["successes"] / 300 < 0.9  # about 20% failed downloads
    assert 25_000 < (raw / "00000.tar").stat().st_size / stats["successes"] < 50_000
    result = shards.build(raw, tmp_path / "train", processes=1)
    assert result["reconciliation"]["shards_balanced"] and result["reconciliation"]["download_balanced"]
    assert 0 < sum(result["reconciliation"]["rejected"].values()) < 0.1 * stats["successes"]
