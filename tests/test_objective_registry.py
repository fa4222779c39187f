"""Objectives register themselves: every module of model/objectives is found without a central list, each name once,
and a config's objectives are those it names, in the pass order."""

import pkgutil

import pytest

import model.objectives
from model.meta_arch import ModelConfig
from model.objectives import OBJECTIVES, PASS_ORDER
from model.objectives.objective import Objective, register


def test_every_module_of_the_package_registers_its_objectives():
    modules = {module.name for module in pkgutil.iter_modules(model.objectives.__path__)} - {"objective"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in OBJECTIVES.values()} == modules
    assert set(PASS_ORDER) == set(OBJECTIVES)
    assert PASS_ORDER[:2] == ("ibot", "clip") and PASS_ORDER.index("masked_text") < PASS_ORDER.index("mae")  # Harmony's


@pytest.mark.parametrize("name", ["", "clip"], ids=["no name", "taken"])
def test_a_nameless_or_taken_name_is_refused(name):
    with pytest.raises(ValueError, match="empty or already registered"):
        register(type("Another", (Objective,), {"name": name}))


def test_a_configs_objectives_are_the_named_ones_in_pass_order():
    config = ModelConfig(objectives={"simclr": True, "masked_text": {"distillation": False}, "clip": {},
                                     "mae": False})
    assert tuple(config.objectives) == ("clip", "simclr", "masked_text")
