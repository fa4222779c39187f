"""The config check: every setting's declared range, ordered pairs, preset bases, "did you mean", warm-up warnings,
the settings line a run prints (issues 30 and 31)."""

import dataclasses
import typing

import pytest
import yaml

from model.meta_arch import ModelConfig
from model.objectives import OBJECTIVES
from train import config as train_config
from train.config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    config_warnings,
    load_config,
    parse_command_line,
    preset_names,
    settings_line,
)

SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig,
            **{f"model.objectives.{name}": objective.Settings for name, objective in OBJECTIVES.items()}}
HARMONY_DEMO = "harmony/demo"
# every preset but the bases (base/<scale>: towers, data and optimisation, no objective: they do not load alone)
LOADABLE_PRESETS = [name for name in preset_names() if not name.startswith("base/")]


def config_error(*overrides, preset=HARMONY_DEMO):
    """The one-line message `python -m train.config` exits with."""
    with pytest.raises(SystemExit) as exited:
        parse_command_line(["--config", preset, *overrides], "")
    message = str(exited.value.code)
    assert message.startswith("config error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("override, named", [
    ("model.objectives.clip.weight=-1",
     "model.objectives.clip.weight=-1.0 is out of range: it must be a number at least 0"),
    ("optim.teacher_momentum=2", "optim.teacher_momentum=2.0 is out of range: it must be a number from 0 to 1"),
    ("model.patch_size=0", "model.patch_size=0 is out of range: it must be a number at least 1"),
    ("model.patch_size=-16", "model.patch_size=-16 is out of range"),
    ("model.clip_dim=0", "model.clip_dim=0 is out of range"),
    ("data.global_crop_px=0", "data.global_crop_px=0 is out of range"),
    ("data.local_crop_px=-96", "data.local_crop_px=-96 is out of range"),
    ("data.global_crop_scale=[1.0, 0.32]", "data.global_crop_scale=[1.0, 0.32] is reversed"),
    ("data.local_crop_scale=[0.32, 0.05]", "data.local_crop_scale=[0.32, 0.05] is reversed"),
    ("data.global_crop_scale=[0.5, 2]", "data.global_crop_scale=[0.5, 2.0] is out of range: item 2"),
    ("data.hue=5", "data.hue=5.0 is out of range: it must be a number from 0 to 0.5"),
    ("data.grayscale_prob=-1", "data.grayscale_prob=-1.0 is out of range: it must be a number from 0 to 1"),
    ("data.global_flip_prob=1.5", "data.global_flip_prob=1.5 is out of range"),
    ("model.objectives.ibot.student_temp=0",
     "model.objectives.ibot.student_temp=0.0 is out of range: it must be a number above 0"),
    ("model.objectives.clip.soft_temperature=-0.1", "model.objectives.clip.soft_temperature=-0.1 is out of range"),
    ("model.objectives.simclr.temperature=0", "model.objectives.simclr.temperature=0.0 is out of range"),
    ("optim.teacher_cls_temp=0", "optim.teacher_cls_temp=0.0 is out of range"),
    ("optim.warmup_teacher_patch_temp=-0.04", "optim.warmup_teacher_patch_temp=-0.04 is out of range"),
    ("optim.warmup_teacher_patch_temp=0.5", "optim.warmup_teacher_patch_temp=0.5 is above optim.teacher_patch_temp"),
    ("optim.warmup_teacher_cls_temp=0.1", "optim.warmup_teacher_cls_temp=0.1 is above optim.teacher_cls_temp"),
    ("optim.min_lr=0.01", "optim.min_lr=0.01 is above optim.lr=0.004: min_lr must be at most lr"),
    ("model.text_layers=0", "model.text_layers=0 is out of range"),
    ("run.seed=-1", "run.seed=-1 is out of range: it must be a number from 0 to 2147483647"),
    ("optim.lr=.nan", "optim.lr=nan is out of range: it must be a finite number above 0"),
    ("optim.lr=nan", "optim.lr=nan is out of range: it must be a finite number"),
    ("optim.lr=.inf", "optim.lr=inf is out of range: it must be a finite number"),
    ("optim.lr=0", "optim.lr=0.0 is out of range"),
    ("optim.betas=[2, 3]", "optim.betas=[2.0, 3.0] is out of range: item 1 must be a number at least 0 and below 1"),
    ("optim.eps=0", "optim.eps=0.0 is out of range"),
    ("optim.epochs=0", "optim.epochs=0 is out of range"),
    ("optim.clip_hard_weight_end=2", "optim.clip_hard_weight_end=2.0 is out of range"),
    ("model.drop_path_rate=1", "model.drop_path_rate=1.0 is out of range"),
    ("model.objectives.ibot.center_momentum=-0.1", "model.objectives.ibot.center_momentum=-0.1 is out of range"),
    ("model.objectives.clip.logit_scale_init=.inf",
     "model.objectives.clip.logit_scale_init=inf is out of range: it must be a finite number"),
    ("model.objectives.mae.mask_ratio=1", "model.objectives.mae.mask_ratio=1.0 is out of range"),
    ("model.objectives.swalip.iterations=0", "model.objectives.swalip.iterations=0 is out of range"),
    ("model.objectives.clip.views=3",
     "model.objectives.clip.views=3 is out of range: it must be a number from 1 to 2"),
    ("data.batch_size=0", "data.batch_size=0 is out of range"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("run.log_every=0", "run.log_every=0 is out of range"),
    ("run.max_steps=-1", "run.max_steps=-1 is out of range"),
    ("data.mix_weights=[.inf, 1]", "data.mix_weights=[inf, 1.0] is out of range: item 1 must be a finite number"),
    ("data.mix_weights=[.nan, 1]", "data.mix_weights=[nan, 1.0] is out of range: item 1"),
    ("data.mix_weights=[1.0e+9, 1]", "data.mix_weights=[1000000000.0, 1.0] is out of range: item 1 must be a number "
                                     "above 0 and at most 1000"),
    ("data.mix_weights=[1e9, 1]", "data.mix_weights=[1000000000.0, 1.0] is out of range"),
    ("data.mix_weights=[0, 1]", "data.mix_weights=[0.0, 1.0] is out of range"),
    ("data.mix_weights=[-1, 1]", "data.mix_weights=[-1.0, 1.0] is out of range"),
])
def test_a_value_out_of_its_range_is_one_line_naming_the_setting_and_the_range(override, named):
    assert named in config_error(override)


@pytest.mark.parametrize("overrides, named", [
    (["data.global_crop_px=96"], "data.global_crop_px=96 and model.global_crop_px=64 differ"),
    (["model.text_heads=3"], "model.text_heads=3 does not divide model.text_width (128)"),
    (["model.objectives.mae.decoder_heads=5"],
     "model.objectives.mae.decoder_heads=5 does not divide model.objectives.mae.decoder_width"),
    (["model.objectives.masked_text.mlm_decoder_heads=3"],
     "model.objectives.masked_text.mlm_decoder_heads=3 does not divide model.text_width"),
])
def test_settings_that_must_agree_are_one_line_before_anything_runs(overrides, named):
    """Two facts that must agree (the crop size the data makes and the model's position table; a width and its
    attention heads) are refused at the check, not as a shape error from deep inside the first step."""
    assert named in config_error(*overrides)


def test_a_negative_weight_is_refused_for_every_weight_of_every_preset():
    """Every loss weight of every objective, set to -1 in every preset (which enables the objective where the
    preset does not), is refused naming it."""
    weights = [(name, setting.name) for name, objective in OBJECTIVES.items()
               for setting in dataclasses.fields(objective.Settings) if setting.name.endswith("weight")]
    assert len(weights) >= 14
    for preset in LOADABLE_PRESETS:
        model = vars(load_config(preset).model)
        for name, weight in weights:
            settings = dataclasses.replace(model["objectives"].get(name, OBJECTIVES[name].Settings()),
                                           **{weight: -1.0})
            with pytest.raises(ValueError, match=f"^model.objectives.{name}.{weight}=-1.0 is out of range: it must "
                                                 f"be a number at least 0 .a loss weight"):
                ModelConfig(**{**model, "objectives": {**model["objectives"], name: settings}})


def numeric(annotation):
    """Whether a field of this type holds numbers (one, or a tuple of them)."""
    return annotation in (int, float) or (typing.get_origin(annotation) is tuple
                                          and set(typing.get_args(annotation)) - {Ellipsis} <= {int, float})


@pytest.mark.parametrize("section", SECTIONS)
def test_every_numeric_setting_declares_its_range(section):
    hints = typing.get_type_hints(SECTIONS[section])
    undeclared = [setting.name for setting in dataclasses.fields(SECTIONS[section])
                  if numeric(hints[setting.name]) and "range" not in setting.metadata]
    assert undeclared == []


def test_every_preset_passes_the_check_without_a_warning():
    for preset in LOADABLE_PRESETS:
        assert config_warnings(load_config(preset)) == [], preset


@pytest.mark.parametrize("override, value", [
    ("optim.lr=5e-4", 5e-4), ("optim.lr=1E-3", 1e-3), ("optim.lr=2.5e-4", 2.5e-4), ("optim.lr=1_0e-4", 1e-3),
    ("data.cache_limit_gb=1e3", 1000.0),
])
def test_any_python_float_syntax_is_a_number(override, value):
    key = override.split("=")[0]
    section, name = key.split(".")
    assert getattr(getattr(load_config(HARMONY_DEMO, [override]), section), name) == value


def test_weights_in_any_float_syntax_are_numbers():
    assert load_config(HARMONY_DEMO, ["data.mix_weights=[1e2, 5E-1]"]).data.mix_weights == (100.0, 0.5)


@pytest.mark.parametrize("bases, cycle", [
    ({"a": "a"}, "a -> a"),
    ({"a": "b", "b": "a"}, "a -> b -> a"),
    ({"a": "b", "b": "c", "c": "b"}, "b -> c -> b"),
])
def test_a_cycle_of_bases_is_one_line_naming_it(tmp_path, bases, cycle):
    for name, base in bases.items():
        (tmp_path / f"{name}.yaml").write_text(f"base: {tmp_path / base}.yaml\noptim:\n  epochs: 2\n")
    with pytest.raises(ValueError, match=f"its bases make a cycle \\({cycle}\\); give one of them another base"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("arguments, hint", [
    (["optim.lrr=1"], "unknown config key(s) ['optim.lrr']. Did you mean optim.lr?"),
    (["model.objectives.clip.wieght=1"], "unknown config key(s) ['model.objectives.clip.wieght']. Did you mean "
                                         "model.objectives.clip.weight? "),
    (["model.objectives.clp={}"], "model.objectives.clp: no such objective; did you mean clip "),
    (["optm.lr=1"], "unknown config key(s) ['optm']. Did you mean optim? The top level has: model, data, optim, run"),
    (["--config", "sigllip/demo"], "config preset 'sigllip/demo' not found"),
    (["--config", "sigllip/demo"], "Did you mean siglip/demo "),
])
def test_a_typo_gets_the_closest_names(arguments, hint):
    preset = arguments[1] if arguments[0] == "--config" else HARMONY_DEMO
    overrides = [] if arguments[0] == "--config" else arguments
    assert hint in config_error(*overrides, preset=preset)


@pytest.mark.parametrize("overrides, warned", [
    (["optim.epochs=1"], ["optim.warmup_epochs=1 is not below optim.epochs=1",
                          "optim.warmup_teacher_temp_epochs=2 is above optim.epochs=1"]),
    (["optim.epochs=3", "optim.warmup_epochs=5"], ["optim.warmup_epochs=5 is not below optim.epochs=3"]),
    (["optim.epochs=2", "optim.warmup_epochs=1", "optim.warmup_teacher_temp_epochs=3"],
     ["optim.warmup_teacher_temp_epochs=3 is above optim.epochs=2"]),
    (["optim.epochs=2", "optim.warmup_epochs=1"], []),
])
def test_a_warm_up_as_long_as_the_run_is_a_warning(overrides, warned):
    lines = config_warnings(load_config(HARMONY_DEMO, overrides))
    assert [line.split(":")[0] for line in lines] == warned


def test_the_check_prints_the_warning_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(train_config, "check_shards", lambda data: None)
    parse_command_line(["--config", HARMONY_DEMO, "optim.epochs=1", "optim.warmup_teacher_temp_epochs=1"], "")
    assert capsys.readouterr().err.splitlines() == [
        "config warning: optim.warmup_epochs=1 is not below optim.epochs=1: the learning rate warms up for the whole "
        "run and never decays from optim.lr; lower optim.warmup_epochs if that is not meant"]


def test_a_run_prints_only_the_settings_its_preset_does_not_give():
    config = load_config(HARMONY_DEMO, ["optim.epochs=3", "model.objectives.mae=false"])
    assert settings_line(config, load_config(HARMONY_DEMO), "runs/harmony_demo/config.yaml") == (
        "config: the preset with model.objectives.mae=False, optim.epochs=3; the whole config is in "
        "runs/harmony_demo/config.yaml")
    added = load_config("clip/demo", ["model.objectives.mae={}", "model.objectives.clip.weight=2"])
    assert settings_line(added, load_config("clip/demo"), "x.yaml") == (
        "config: the preset with model.objectives.clip.weight=2.0, model.objectives.mae=True; the whole config is in "
        "x.yaml")
    assert settings_line(load_config(HARMONY_DEMO), load_config(HARMONY_DEMO), "x.yaml").startswith(
        "config: the preset with none;")
    without_preset = settings_line(config, None, "x.yaml")
    assert without_preset.startswith("config: the defaults with data.batch_size=64, ")
    # the defaults name no objective: every objective setting the run has is listed, none it left out
    assert "model.objectives.ibot.out_dim=512, " in without_preset and "model.objectives.mae" not in without_preset


def test_a_run_prints_its_overrides_in_one_line_and_keeps_the_whole_config(demo_shards, tmp_path, capsys):
    from test_train import TINY_MODEL

    from train.pretrain import main

    main(["--config", HARMONY_DEMO, *TINY_MODEL, f"data.shards={demo_shards['train']}", f"run.out_dir={tmp_path}",
          "run.name=run", "run.max_steps=1"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("config: ")]
    assert len(printed) == 1 and printed[0].startswith("config: the preset with data.backend=torch, ")
    assert printed[0].endswith(f", run.out_dir={tmp_path}; the whole config is in {tmp_path / 'run' / 'config.yaml'}")
    assert "model.objectives.ibot.patch_weight" not in printed[0] and "model.objectives.barlip" not in printed[0]
    assert "model.patch_size=8, " in printed[0] and "run.max_steps=1, " in printed[0]
    assert "model.objectives.ibot.out_dim=64, " in printed[0]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["objectives"]["ibot"]["patch_weight"] == 0.5 and saved["model"]["patch_size"] == 8
    assert saved["model"]["objectives"]["ibot"]["out_dim"] == 64 and "barlip" not in saved["model"]["objectives"]
