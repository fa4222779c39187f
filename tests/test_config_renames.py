"""Configs written before objectives owned their settings still mean what they meant (train/config_renames.py).

tests/data/old_configs/ was written by the code just before the move (commit 736735e): presets_resolved.json holds every
preset's resolved config under its old name and keys; tiny_losses.json every demo method's model at tiny shapes (its
flat settings), its parameter shapes and its first three training losses on a fixed batch.
"""

import json
from pathlib import Path

import pytest
import torch
from test_clip_rocket import rocket_batch
from test_harmony import tiny_batch
from test_methods import train_steps
from test_slip_aclip import aclip_batch, slip_batch

from comparison import plan as plans
from comparison.run import NOT_SETTINGS
from model.meta_arch import MetaArch, ModelConfig
from train.config import config_from_dict, flatten, load_config, to_dict
from train.config_renames import PRESET_RENAMES, migrate

OLD = Path(__file__).parent / "data" / "old_configs"
OLD_PRESETS = json.loads((OLD / "presets_resolved.json").read_text())
TINY_METHODS = json.loads((OLD / "tiny_losses.json").read_text())
BATCHES = {"auto": lambda: tiny_batch(batch=6), "slip": slip_batch, "aclip": aclip_batch, "clip_rocket": rocket_batch}


def without_run_name(config):
    values = to_dict(config)
    values["run"].pop("name")
    return values


def test_every_old_preset_name_has_a_new_preset():
    assert set(OLD_PRESETS) == set(PRESET_RENAMES)


@pytest.mark.parametrize("old_name", sorted(OLD_PRESETS))
def test_each_preset_under_its_new_name_is_the_config_it_was(old_name):
    new_name = PRESET_RENAMES[old_name]
    assert without_run_name(load_config(new_name)) == without_run_name(config_from_dict(OLD_PRESETS[old_name]))
    notices = []
    assert to_dict(load_config(old_name, notices=notices)) == to_dict(load_config(new_name))
    assert notices == [f"config notice: preset {old_name} is now {new_name}; the old names work for one more release"]


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_each_method_builds_the_same_networks_and_losses_from_its_old_settings(method):
    recorded = TINY_METHODS[method]
    model_values, renamed = migrate({"model": recorded["model"]})
    assert renamed
    torch.manual_seed(0)
    model = MetaArch(ModelConfig(**model_values["model"]))
    assert {name: list(tensor.shape) for name, tensor in model.state_dict().items()} == recorded["parameters"]
    torch.manual_seed(2)
    batch = BATCHES[recorded["views"]]()
    assert train_steps(model, batch, steps=3) == pytest.approx(recorded["losses"], rel=1e-5)


def test_old_keys_on_the_command_line_set_the_new_settings_with_one_notice():
    notices = []
    old = load_config("harmony/demo", ["model.mae=false", "model.ibot_patch_weight=0", "model.mlm=false",
                                       "model.soft_clip=false", "model.logit_scale_max=50"], notices)
    new = load_config("harmony/demo", ["model.objectives.mae=false", "model.objectives.ibot.patch_weight=0",
                                       "model.objectives.masked_text.mlm=false",
                                       "model.objectives.clip.soft_targets=false",
                                       "model.objectives.clip.logit_scale_max=50"])
    assert to_dict(old) == to_dict(new)
    assert len(notices) == 1 and notices[0].startswith("config notice: model.ibot_patch_weight, model.logit_scale_max")


def test_both_text_switches_off_leave_the_masked_text_objective_out():
    config = load_config("harmony/demo", ["model.mlm=false", "model.text_distillation=false"])
    assert list(config.model.objectives) == ["ibot", "clip", "mae"]


def test_an_old_soft_clip_switch_without_clip_is_refused_in_one_line():
    with pytest.raises(ValueError, match="needs clip: set clip=true or soft_clip=false"):
        load_config("m3ae/demo", ["model.soft_clip=true"])


def test_a_compare_plan_written_before_the_move_continues_with_its_runs_equal(tmp_path):
    """A plan's fingerprint holds the old flat keys and the old preset name: read today, it equals the fingerprint
    today's code computes for the same method, so nothing is retrained or refused for the move."""
    old_config = {key: value for key, value in flatten(OLD_PRESETS["siglip_demo"]).items() if key not in NOT_SETTINGS}
    run = plans.new_run("siglip", 0, "siglip_demo", {"config": old_config, "code_sha256": "same"})
    plans.save(tmp_path, {"version": plans.VERSION, "runs": {plans.run_key("siglip", 0): run}, "measured": {}})
    saved = plans.load(tmp_path)["runs"][plans.run_key("siglip", 0)]
    assert saved["preset"] == "siglip/demo"
    today = {key: value for key, value in flatten(to_dict(load_config("siglip/demo"))).items()
             if key not in NOT_SETTINGS}
    assert plans.differences(saved["fingerprint"], {"config": today, "code_sha256": "same"}) == []
