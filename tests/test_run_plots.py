"""A run logs and plots what its method has: every loss term of the method, and only the schedules it uses (a
SigLIP run has no teacher, so no momentum or teacher temperatures)."""

import json

import pytest
from test_train import tiny

from train.config import load_config
from train.log import SCHEDULES, loss_terms

HARMONY_SCHEDULES = {"lr", "weight_decay", "teacher_momentum", "clip_hard_weight", "teacher_cls_temp",
                     "teacher_patch_temp", "logit_scale"}


@pytest.mark.parametrize("preset, losses, schedules", [
    ("siglip/demo", ["loss", "clip", "siglip"], {"lr", "weight_decay", "logit_scale", "logit_bias"}),
    ("harmony/demo", ["loss", "ibot_cls", "ibot_patch", "ibot", "clip_hard", "clip_soft", "clip", "mlm",
                      "text_distillation", "mae"], HARMONY_SCHEDULES),
])
def test_a_run_logs_and_plots_its_methods_terms_and_schedules(demo_shards, tmp_path, preset, losses, schedules):
    from train.pretrain import train

    run = train(load_config(preset, [*tiny(preset), "run.max_steps=2", f"data.shards={demo_shards['train']}",
                                     f"run.out_dir={tmp_path}", "run.name=run"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(loss_terms(rows)) == sorted(losses) and loss_terms(rows)[0] == "loss"
    assert {name for row in rows for name in row if name in SCHEDULES} == schedules
    assert (run / "plots" / "losses.png").stat().st_size > 0 and (run / "plots" / "schedules.png").is_file()
