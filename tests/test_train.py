"""Trainer: schedules, configs, EMA, exact resume, distributed equivalence, non-finite steps."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from doc_commands import documented_mixtures
from test_harmony import tiny_batch
from tiny_models import tiny_overrides

from train import checkpoint
from train.config import load_config, preset_names
from train.distributed import free_loopback_port
from train.ema import update_teachers
from train.schedules import Schedules, cosine

HARMONY_DEMO = "harmony/demo"
# the trainer's data and run settings at tiny shapes (the model's come from tiny_overrides)
TINY_TRAINING = ["data.global_crop_px=32", "data.local_crop_px=16", "data.local_crops_number=2", "data.batch_size=8",
                 "data.num_workers=0", "data.backend=torch", "run.precision=fp32", "run.log_every=1"]


def tiny(preset):
    """Overrides that shrink `preset`'s towers, the objectives it enables, and its training (an override naming an
    objective the preset does not enable would enable it, so each preset gets its own)."""
    return [*tiny_overrides(preset), *TINY_TRAINING]


TINY_MODEL = tiny(HARMONY_DEMO)  # Harmony's demo at tiny shapes


def tiny_config(shards, run_dir, *overrides):
    return load_config(HARMONY_DEMO, [*TINY_MODEL, f"data.shards={shards}", f"run.out_dir={run_dir.parent}",
                                f"run.name={run_dir.name}", *overrides])


def test_schedules_follow_their_formulas():
    optim = load_config("harmony/cc3m").optim
    schedules = Schedules(optim, iterations_per_epoch=100, global_batch=768)
    peak = 5e-4 * 768 / 256
    assert schedules.at(0)["lr"] == 0 and schedules.at(299)["lr"] == pytest.approx(peak)  # 3 warm-up epochs
    assert schedules.at(150)["lr"] == pytest.approx(peak * 150 / 299)
    middle = 300 + (2500 - 300) // 2
    assert schedules.at(middle)["lr"] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6), rel=1e-9)
    assert schedules.at(1250)["weight_decay"] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 2)))
    assert schedules.at(0)["teacher_momentum"] == 0.996 and schedules.at(2499)["teacher_momentum"] < 1
    alpha = [schedules.at(epoch * 100)["clip_hard_weight"] for epoch in (0, 5, 10, 20)]
    assert alpha == pytest.approx([1.0, 0.6, 0.2, 0.2])  # cosine over 10 epochs, then constant
    patch_temps = [schedules.at(epoch * 100)["teacher_patch_temp"] for epoch in range(7)]
    assert patch_temps == pytest.approx([0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07, 0.07])
    assert {schedules.at(epoch * 100)["teacher_cls_temp"] for epoch in range(7)} == {0.04}
    assert cosine(1.0, 0.0, 7, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.7)))


def loadable_presets():
    """Every preset but the bases (`base/<scale>`: towers, data and optimisation; they name no objective)."""
    return [name for name in preset_names() if not name.startswith("base/")]


def test_every_preset_loads_and_overrides_apply():
    assert len(loadable_presets()) >= 40 and "harmony/demo" in loadable_presets()
    for preset in loadable_presets():
        load_config(preset)
    for base in ("base/demo", "base/cc3m"):  # a base alone names no objective
        with pytest.raises(ValueError, match="model.objectives names no objective"):
            load_config(base)
    config = load_config(HARMONY_DEMO, ["optim.lr=0.01", "model.objectives.mae=false",
                                        "data.global_crop_scale=[0.5, 1.0]"])
    assert config.optim.lr == 0.01 and "mae" not in config.model.objectives and \
        config.data.global_crop_scale == (0.5, 1.0)
    assert list(config.model.objectives) == ["ibot", "clip", "masked_text"]
    assert "ibot" not in load_config("ablations/harmony_clip").model.objectives  # the baseline trains CLIP alone
    assert list(load_config("ablations/harmony_clip").model.objectives) == ["clip"]
    added = load_config("clip/demo", ["model.objectives.simclr={}", "model.objectives.clip.weight=2",
                                      "data.views=slip"]).model
    assert list(added.objectives) == ["clip", "simclr"] and added.objectives["clip"].weight == 2.0


def test_an_old_preset_name_and_old_keys_load_with_a_one_line_notice():
    """Names from before presets moved to one folder per method, and flat model keys from before objectives owned
    their settings, still load (for one release) as their new ones, with one line saying so."""
    notices = []
    assert load_config("demo", notices=notices) == load_config(HARMONY_DEMO)
    assert notices == ["config notice: preset demo is now harmony/demo; the old names work for one more release"]
    notices = []
    old = load_config("clip_demo", ["model.clip_weight=2", "model.mae=false"], notices)
    assert old == load_config("clip/demo", ["model.objectives.clip.weight=2"])
    assert notices == ["config notice: preset clip_demo is now clip/demo; model.clip_weight, model.mae are now under "
                       "model.objectives (docs/config.md lists the new names); the old names work for one more "
                       "release"]
    notices = []
    load_config(HARMONY_DEMO, notices=notices)
    assert notices == []  # new names: no notice


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=1"], "unknown config key"), (["optim.lr"], "key=value"),
    (["optim=3"], r"optim=3: optim is a section, not a value; set its keys \(optim.<key>=...\), which are: epochs"),
    (["optim.epochs=1.5"], "optim.epochs=1.5: it must be a whole number"),
    (["model.objectives.clip.soft_targets=maybe"], "model.objectives.clip.soft_targets='maybe': it must be true or "
                                                    "false"),
    (["model.objectives.mae=maybe"], r"model.objectives.mae='maybe': give its settings \(\{\} or true for the "
                                     r"defaults\), or false to leave it out"),
    (["run.name=2024"], "run.name=2024: it must be text"),
    (["data.global_crop_scale=0.5"], r"data.global_crop_scale=0.5: it must be a list of 2 values"),
    (["optim.lr=[1,"], "override 'optim.lr=\\[1,': '\\[1,' is not a value"),
    (["data.mix_weights=[1, x]"], r"data.mix_weights=\[1, 'x'\]: it must be a list of numbers"),
    (["data.mix_weights=2"], "data.mix_weights=2: it must be a list of numbers"),
    (["data.batch_size=[8, 16]"], r"data.batch_size=\[8, 16\]: it takes one value, not a list; it must be a whole"),
    (["data.shards=[[a]]"], r"data.shards=\[\['a'\]\]: it must be text .* or a list of texts"),
    (["data.shards=[]"], "data.shards is empty"),
    (["run.trust_unverified_checkpoint=true"], "applies to run.resume=<a checkpoint path> only"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(HARMONY_DEMO, overrides)
    with pytest.raises(FileNotFoundError, match="presets"):
        load_config("no_such_preset")


@pytest.mark.parametrize("resume, message", [
    ("atuo", "run.resume='atuo': does not exist. Did you mean run.resume=auto? The value must be auto"),
    ("{tmp}/nowhere/checkpoint-00000002.pt", "checkpoint-00000002.pt': does not exist. The value must be auto"),
    ("{tmp}", "is a folder, not a checkpoint file"),
])
def test_run_resume_names_what_it_could_not_find(tmp_path, resume, message):
    from train.config import parse_command_line

    with pytest.raises(SystemExit, match=f"config error: .*{re.escape(message)}"):
        parse_command_line(["--config", HARMONY_DEMO, f"run.resume={resume.format(tmp=tmp_path)}"], "")


def test_shards_that_are_not_there_are_a_config_error(tmp_path):
    from train.pretrain import main

    with pytest.raises(SystemExit, match=f"config error: {tmp_path}/nowhere/manifest.json not found: point the "
                                         f"loader at a folder written by `make shards`"):
        main(["--config", HARMONY_DEMO, f"data.shards={tmp_path}/nowhere", f"run.out_dir={tmp_path}"])


def test_a_mixture_is_set_by_overrides_and_by_presets(tmp_path):
    """docs/data.md "Mixing datasets by weight": several shard locations and their weights, as key=value (each
    documented `make pretrain` mixture as make hands it to the trainer, and others) or in YAML."""
    preset = tmp_path / "mixture.yaml"
    preset.write_text("base: harmony/demo\ndata:\n  shards: [a/train, s3://bucket/b/train]\n  mix_weights: [1, 0.5]\n")
    overridden = load_config(HARMONY_DEMO, ["data.shards=[a/train, s3://bucket/b/train]", "data.mix_weights=[1, 0.5]"])
    for config in (overridden, load_config(preset)):
        assert config.data.shards == ["a/train", "s3://bucket/b/train"] and config.data.mix_weights == (1.0, 0.5)
    mixtures = documented_mixtures()
    assert len(mixtures) >= 2, mixtures
    for overrides in mixtures:
        written = {key: value.strip("[]").split(",") for key, value in (word.split("=", 1) for word in overrides)}
        config = load_config(HARMONY_DEMO, overrides)
        assert config.data.shards == [path.strip() for path in written["data.shards"]], overrides
        assert config.data.mix_weights == tuple(float(weight) for weight in written["data.mix_weights"]), overrides
    assert load_config(HARMONY_DEMO, ["data.shards=s3://bucket/b/train"]).data.shards == "s3://bucket/b/train"


def test_integers_are_taken_for_numbers_and_nothing_else_is_converted():
    config = load_config(HARMONY_DEMO, ["optim.lr=1", "data.global_crop_scale=[0, 1]"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.data.global_crop_scale == (0, 1)


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: [0.1\n", "is not valid YAML at line 3, column 1"),
    ("- optim\n", "must hold `key: value` settings .*, not a list"),
])
def test_a_preset_that_is_not_a_mapping_of_settings_names_its_file(tmp_path, text, message):
    preset = tmp_path / "mine.yaml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=f"config preset {preset} {message}"):
        load_config(str(preset))


def test_ema_update_is_the_momentum_average():
    teachers, students = [torch.ones(3), torch.zeros(2)], [torch.zeros(3), torch.ones(2)]
    update_teachers(teachers, students, momentum=0.9)
    torch.testing.assert_close(teachers[0], torch.full((3,), 0.9))
    torch.testing.assert_close(teachers[1], torch.full((2,), 0.1))


def losses_logged(run_dir):
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_exact_resume_equals_an_uninterrupted_run(demo_shards, tmp_path, backend):
    """Killed after step 6 with its last checkpoint at step 4, resumed: every later loss is the uninterrupted
    run's, and metrics.jsonl holds each step once."""
    from train.pretrain import train

    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("run.checkpoint_every=4", "model.drop_path_rate=0.1", f"data.backend={backend}")
    train(tiny_config(demo_shards["train"], whole, "run.max_steps=8", *common))
    train(tiny_config(demo_shards["train"], split, "run.max_steps=6", *common))
    killed = checkpoint.latest_checkpoint(split)  # step 6: as if the process died before writing it
    killed.unlink()
    checkpoint.sidecar(killed).unlink()
    train(tiny_config(demo_shards["train"], split, "run.max_steps=8", *common))  # resume=auto, from step 4
    assert [row["step"] for row in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())] == \
        list(range(1, 9))
    assert losses_logged(split) == losses_logged(whole)
    final_whole = checkpoint.load(checkpoint.latest_checkpoint(whole))
    final_split = checkpoint.load(checkpoint.latest_checkpoint(split))
    assert final_whole["step"] == final_split["step"] == 8
    for name, value in final_whole["model"].items():  # students, teachers and centres
        torch.testing.assert_close(final_split["model"][name], value, rtol=0, atol=0, msg=name)
    for state_whole, state_split in zip(final_whole["optimizer"]["state"].values(),
                                        final_split["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(state_split["exp_avg_sq"], state_whole["exp_avg_sq"], rtol=0, atol=0)
    assert final_split["loader"] == final_whole["loader"]


def one_step_parameters(shards, run_dir, batch, rank, world_size):
    """Parameters after one trainer step on this rank's share of `batch`."""
    from datapipe import Batch
    from train.pretrain import Trainer, init_distributed

    config = tiny_config(shards, run_dir, "model.objectives.mae=false", "model.objectives.masked_text=false",
                         "optim.clip_hard_weight_epochs=1", f"data.batch_size={8 // world_size}")
    world = init_distributed()
    trainer = Trainer(config, world)
    share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    local = Batch(images={name: batch[name][:, share] for name in ("global_crops", "local_crops")},
                  texts={"caption": batch["tokens"][share][None]},  # (1, B, 77)
                  masks={"global_crops": batch["ibot_masks"][:, share]}, boxes={}, keys=[])
    values = trainer.schedules.at(len(trainer.loader) // 2)  # soft CLIP targets on, lr > 0
    values["lr"] = 1e-3
    _, applied, _ = trainer.train_step(local, values)
    assert applied
    state = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    state.update({f"grad:{name}": param.grad.clone() for name, param in trainer.model.named_parameters()
                  if param.grad is not None})  # averaged over ranks, clipped
    return state


def rank_main(rank, port, shards, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from train.distributed import close_distributed

    try:
        state = one_step_parameters(shards, run_dir, tiny_batch(batch=8), rank, 2)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_distributed()


def test_two_rank_step_equals_one_rank_step_on_the_whole_batch(demo_shards, tmp_path):
    mp.spawn(rank_main, args=(free_loopback_port(), str(demo_shards["train"]), tmp_path / "run", str(tmp_path)),
             nprocs=2)
    single = one_step_parameters(demo_shards["train"], tmp_path / "run", tiny_batch(batch=8), 0, 1)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0].keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=f"ranks differ: {name}")
        if name.startswith("grad:") or "center" in name:
            scale = value.abs().max().item()  # float sums in another order: relative to the tensor's scale
            torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)
        else:  # Adam's first step moves each weight by about lr * sign(gradient): compare at that scale
            torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=2e-3, msg=name)


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(demo_shards, tmp_path):
    from train.pretrain import train

    run = tmp_path / "run"
    train(tiny_config(demo_shards["train"], run, "run.max_steps=2", "run.checkpoint_every=2"))
    with pytest.raises(FloatingPointError, match="non-finite"):  # lr = 1e30 makes the weights, then losses, NaN
        train(tiny_config(demo_shards["train"], run, "run.max_steps=20", "optim.lr=1e30", "optim.warmup_epochs=0",
                          "run.max_nonfinite_steps=2", "run.checkpoint_every=1000", "run.accept_config_changes=true"))
    intact = checkpoint.load(checkpoint.latest_checkpoint(run))
    assert intact["step"] == 2 and all(torch.isfinite(value).all() for value in intact["model"].values()
                                       if value.is_floating_point())


def test_clip_only_baseline_trains(demo_shards, tmp_path):
    from train.pretrain import train

    run = train(load_config("clip/demo", [*tiny("clip/demo"), "data.local_crops_number=0", "optim.epochs=3",
                                          f"data.shards={demo_shards['train']}", f"run.out_dir={tmp_path}",
                                          "run.name=clip"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"clip_hard", "lr", "logit_scale"} and "ibot" not in rows[0]
    assert sum(row["clip_hard"] for row in rows[-3:]) < sum(row["clip_hard"] for row in rows[:3])


@pytest.mark.slow
def test_short_demo_training_learns(larger_demo_shards, tmp_path):
    """The demo preset, shortened: every loss is logged, the total falls, zero-shot beats chance."""
    from evaluation.towers import RunTowers
    from evaluation.zeroshot import zero_shot
    from train.pretrain import train

    run = train(load_config(HARMONY_DEMO, [f"data.shards={larger_demo_shards['train']}", f"run.out_dir={tmp_path}",
                                     "run.name=demo", "data.batch_size=32", "optim.epochs=4"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"ibot", "clip_hard", "clip_soft", "mlm", "text_distillation", "mae"} <= set(rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["clip_hard"] < rows[0]["clip_hard"]
    assert (run / "plots" / "losses.png").is_file() and (run / "plots" / "schedules.png").is_file()
    result = zero_shot(RunTowers(run), larger_demo_shards["heldout"])
    # 300 held-out images at chance 1/30: 3 standard deviations above chance is 6.4%.
    assert result["top1"] > 0.064, result["top1"]


def test_torchrun_two_processes_end_to_end(demo_shards, tmp_path):
    import subprocess
    import sys

    overrides = [*TINY_MODEL, f"data.shards={demo_shards['train']}", f"run.out_dir={tmp_path}", "run.name=ddp",
                 "run.max_steps=3", "data.backend=dali", "data.num_workers=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train.pretrain", "--config", HARMONY_DEMO, *overrides]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "trained 3 steps (48 images" in finished.stdout  # 2 ranks x batch 8 x 3 steps
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "ddp"))
    assert state["step"] == 3 and state["loader"]["world_size"] == 2
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 writes, once per step


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(demo_shards, tmp_path, precision):
    """bf16 autocast, and fp16 autocast with one GradScaler over every backward, on this CPU."""
    from train.pretrain import train

    run = train(tiny_config(demo_shards["train"], tmp_path / precision, "run.max_steps=2",
                            f"run.precision={precision}"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows) and rows[-1]["nonfinite_steps"] == 0
    state = checkpoint.load(checkpoint.latest_checkpoint(run))
    assert (state["scaler"] is not None) == (precision == "fp16")


@pytest.mark.parametrize("config, train_args, message", [
    (HARMONY_DEMO, "optim.epochs=1.5", "optim.epochs=1.5: it must be a whole number"),
    ("broken.yaml", "", "broken.yaml is not valid YAML at line 1"),
])
def test_make_pretrain_says_a_config_error_once_and_never_starts_torchrun(tmp_path, config, train_args, message):
    import subprocess

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "00000_stats.json").write_text("{}")  # `make data` sees a download and shards: skipped
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text("{}")
    (tmp_path / "broken.yaml").write_text("optim: lr: 1\n")
    config = tmp_path / config if config.endswith(".yaml") else config
    done = subprocess.run(["make", "--no-print-directory", "pretrain", f"CONFIG={config}", f"OUT={tmp_path}",
                           f"RAW={tmp_path / 'raw'}", f"RUN={tmp_path / 'run'}", f"TRAIN_ARGS={train_args}"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("make:")]
    assert done.returncode != 0 and len(errors) == 1 and message in errors[0], done.stderr
    assert not (tmp_path / "run").exists()  # torchrun never started


def test_a_setting_added_after_a_checkpoint_counts_as_its_default_on_resume():
    """A checkpoint's config from before data.views, data.global_flip_prob and optim.teacher_momentum_end resumes
    without a reported change when they are at their defaults (what the code did before); CLIP's preset turned flip
    off, and a resume of a CLIP run from before says so."""
    from train.config import resume_differences, to_dict

    saved = to_dict(load_config(HARMONY_DEMO))
    del saved["data"]["views"], saved["data"]["global_flip_prob"], saved["optim"]["teacher_momentum_end"]
    assert resume_differences(saved, to_dict(load_config(HARMONY_DEMO))) == []
    saved = to_dict(load_config("clip/demo"))
    del saved["data"]["global_flip_prob"]
    assert resume_differences(saved, to_dict(load_config("clip/demo"))) == [("data.global_flip_prob", 0.5, 0.0)]


def test_a_run_without_one_finite_step_ends_failed_however_short(demo_shards, tmp_path, capsys):
    """2 steps, fewer than run.max_nonfinite_steps (5), each non-finite (exp(logit scale) overflows): the run is
    failed, with one line saying why, not finished."""
    from train.pretrain import main
    from train.run_folder import read_status

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["--config", HARMONY_DEMO, *TINY_MODEL, f"data.shards={demo_shards['train']}",
              f"run.out_dir={tmp_path}", "run.name=run", "run.max_steps=2",
              "model.objectives.clip.logit_scale_init=1000"])
    reason = ("no step of this run had a finite loss (all 2 up to step 2 were skipped): it trained nothing, so it is "
              "marked failed. Lower optim.lr, or try run.precision=bf16 or fp32.")
    assert exited.value.code == 1
    errors = capsys.readouterr().err
    assert [line for line in errors.splitlines() if "stopped by" in line] == \
        [f"rank 0: stopped by FloatingPointError: {reason}"] and "Traceback" not in errors
    assert read_status(run) == {"state": "failed", "step": None, "error": f"FloatingPointError: {reason}"}
