"""docs/config.md is the config classes' own reference: current, and with a meaning for every setting, every
objective's settings included."""

from pathlib import Path

from model.objectives import OBJECTIVES
from train.config_reference import DEFAULT_OUT, reference, section_rows, sections


def test_the_page_is_what_the_config_classes_say():
    assert Path(DEFAULT_OUT).read_text() == reference(), "docs/config.md is stale: run `make docs`"


def test_every_setting_says_what_it_is():
    rows = [row for section, _, cls in sections() for row in section_rows(section, cls)]
    assert len(rows) > 150
    assert [name for name, _, _, _, meaning in rows if not meaning] == []


def test_every_registered_objective_has_its_section():
    assert {section for section, _, _ in sections()} >= {f"model.objectives.{name}" for name in OBJECTIVES}
