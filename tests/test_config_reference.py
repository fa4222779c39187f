"""docs/config.md is the config classes' own reference: current, and with a meaning for every setting."""

import dataclasses
from pathlib import Path

from train.config import TrainConfig
from train.config_reference import DEFAULT_OUT, reference, section_rows


def test_the_page_is_what_the_config_classes_say():
    assert Path(DEFAULT_OUT).read_text() == reference(), "docs/config.md is stale: run `make docs`"


def test_every_setting_says_what_it_is():
    rows = [row for section in dataclasses.fields(TrainConfig) for row in section_rows(section.name,
                                                                                          section.default_factory)]
    assert len(rows) > 100
    assert [name for name, _, _, _, meaning in rows if not meaning] == []
