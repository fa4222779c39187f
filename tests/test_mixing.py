"""Weighted mixing of shard sets: proportions per epoch, a function of (seed, epoch) only, exact resume."""

import math
import re
from collections import Counter

import numpy as np
import pytest
from conftest import write_training_shards
from doc_commands import documented_mixtures

from datapipe import SingleCrop, make_loader
from datapipe.load import mixing
from datapipe.load.mixing import ShardMixture
from datapipe.load.samples import ShardSet, rank_order

SETTINGS = dict(recipe=SingleCrop(size_px=32), batch_size=4, seed=1, shuffle_window=8, num_workers=0,
                backend="torch")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(1)
    first = write_training_shards(root / "first", rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8), 8)
    second = write_training_shards(root / "second", rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8), 8)
    return first, second


def epoch_sequence(mixture, epoch):
    return [tuple(pair) for pair in rank_order(mixture, seed=1, epoch=epoch, rank=0, world_size=1, batch_size=1,
                                               shuffle_window=8)]


def test_weights_read_a_set_twice_or_in_part_each_epoch(two_sets):
    first, second = (ShardSet.from_path(path) for path in two_sets)
    mixture = ShardMixture([first, second], [2, 0.5])
    assert mixture.total == 2 * 16 + 15
    for epoch in (0, 1):
        sequence = epoch_sequence(mixture, epoch)
        counts = Counter(sequence)
        from_first = [pair for pair in sequence if pair[0] < 2]  # shards 0-1 are the first set's
        assert len(from_first) == 32 and set(counts[pair] for pair in from_first) == {2}
        from_second = [pair for pair in sequence if pair[0] >= 2]
        assert len(from_second) == len(set(from_second)) == 15  # half, none twice
    assert set(epoch_sequence(mixture, 0)) != set(epoch_sequence(mixture, 1))  # another half each epoch
    assert epoch_sequence(mixture, 1) == epoch_sequence(ShardMixture([first, second], [2, 0.5]), 1)


def test_a_mixture_resumes_exactly_and_refuses_other_weights(two_sets):
    settings = dict(SETTINGS, mix_weights=[1, 0.5])
    uninterrupted = [key for batch in make_loader(list(two_sets), **settings) for key in batch.keys]
    first = make_loader(list(two_sets), **settings)
    before = []
    for batch in first:
        before += batch.keys
        if len(before) == 8:
            break
    resumed = make_loader(list(two_sets), **settings)
    resumed.load_state_dict(first.state_dict())
    assert before + [key for batch in resumed for key in batch.keys] == uninterrupted
    assert {key.split(":")[0] for key in uninterrupted} == {"0", "1"}  # "<set>:<shard>/<key>"
    with pytest.raises(ValueError, match="the same training shards"):
        make_loader(list(two_sets), **{**settings, "mix_weights": [1, 1]}).load_state_dict(first.state_dict())


def test_weights_that_do_not_match_the_sets_are_refused(two_sets):
    with pytest.raises(ValueError, match="2 weight.*for 1 shard set"):
        make_loader([two_sets[0]], **SETTINGS, mix_weights=[1, 2])
    with pytest.raises(ValueError, match="data.mix_weights: 0 is not a finite number above 0"):
        make_loader(list(two_sets), **SETTINGS, mix_weights=[1, 0])


def test_the_config_check_takes_a_mixture_and_refuses_weights_that_do_not_fit_it(two_sets):
    """docs/data.md "Mixing datasets by weight": each documented `make pretrain` mixture's weights (its sets replaced
    by two local ones), and others, as make hands them to train.config."""
    from train.config import parse_command_line

    shards = f"data.shards=[{two_sets[0]}, {two_sets[1]}]"
    mixtures = documented_mixtures()
    assert len(mixtures) >= 2, mixtures
    for overrides in mixtures:
        weights = next(word for word in overrides if word.startswith("data.mix_weights="))
        config = parse_command_line(["--config", "harmony/demo", shards, weights], "")
        written = tuple(float(weight) for weight in weights.partition("=")[2].strip("[]").split(","))
        assert config.data.shards == [str(path) for path in two_sets] and config.data.mix_weights == written
    config = parse_command_line(["--config", "harmony/demo", shards, "data.mix_weights=[2, 0.5]"], "")
    assert config.data.shards == [str(path) for path in two_sets] and config.data.mix_weights == (2.0, 0.5)
    with pytest.raises(SystemExit, match=r"config error: data.mix_weights has 3 weight\(s\) for 2 shard set\(s\)"):
        parse_command_line(["--config", "harmony/demo", shards, "data.mix_weights=[1, 2, 3]"], "")


@pytest.mark.parametrize("weight", [math.inf, math.nan, 1e9, 1001, 0, -1, "2", True])
def test_a_weight_that_cannot_make_a_bounded_schedule_is_refused(two_sets, weight):
    """A set is listed once per unit of its weight in each epoch's schedule: at most 1000 units, finite, above 0."""
    first, second = (ShardSet.from_path(path) for path in two_sets)
    message = f"data.mix_weights: {weight!r} is not a finite number above 0 and at most 1000 (2 reads a set twice"
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardMixture([first, second], [weight, 1])


def test_a_weight_that_rounds_a_set_to_no_sample_is_refused(two_sets):
    first, second = (ShardSet.from_path(path) for path in two_sets)
    with pytest.raises(ValueError, match=re.escape(f"data.mix_weights: weight 0.001 of {first.root} reads "
                                                   f"round(0.001 x 16 samples) = 0 samples per epoch, so the set "
                                                   f"would never be read: give it more than 0.5 / 16 = 0.0312")):
        ShardMixture([first, second], [0.001, 1])
    assert ShardMixture([first, second], [0.04, 1]).total == 1 + 30  # 0.64 samples: 1
    assert ShardMixture([first, second], [1000, 1]).total == 1000 * 16 + 30


def test_a_schedule_of_more_shards_than_the_bound_is_refused(two_sets, monkeypatch):
    first, second = (ShardSet.from_path(path) for path in two_sets)  # 2 and 4 shards
    monkeypatch.setattr(mixing, "MAX_LISTED_SHARDS", 10)
    assert ShardMixture([first, second], [1, 2]).total == 16 + 60  # 2 + 8 shards listed
    with pytest.raises(ValueError, match=re.escape("data.mix_weights=[2, 1.5]: each epoch's schedule would list 12 "
                                                   "shards (a set's shards once per unit of weight), more than the "
                                                   "10 it holds in memory")):
        ShardMixture([first, second], [2, 1.5])


@pytest.mark.parametrize("weights, message", [
    ("[0.001, 1]", "data.mix_weights: weight 0.001 of {first} reads round(0.001 x 16 samples) = 0 samples"),
    ("[1.0e+9, 1]", "data.mix_weights=[1000000000.0, 1.0] is out of range: item 1 must be a number above 0 and at "
                    "most 1000"),
    ("[1e9, 1]", "data.mix_weights=[1000000000.0, 1.0] is out of range"),
    ("[.inf, 1]", "data.mix_weights=[inf, 1.0] is out of range: item 1 must be a finite number"),
    ("[.nan, 1]", "data.mix_weights=[nan, 1.0] is out of range: item 1 must be a finite number"),
])
def test_the_config_check_refuses_weights_that_cannot_work_in_one_line(two_sets, weights, message):
    from train.config import parse_command_line

    shards = f"data.shards=[{two_sets[0]}, {two_sets[1]}]"
    with pytest.raises(SystemExit) as exited:
        parse_command_line(["--config", "harmony/demo", shards, f"data.mix_weights={weights}"], "")
    assert str(exited.value.code).startswith(f"config error: {message.format(first=two_sets[0])}")
    assert "\n" not in str(exited.value.code)


def test_the_config_check_takes_weights_in_any_float_syntax(two_sets):
    from train.config import parse_command_line

    shards = f"data.shards=[{two_sets[0]}, {two_sets[1]}]"
    config = parse_command_line(["--config", "harmony/demo", shards, "data.mix_weights=[1e2, 5E-1]"], "")
    assert config.data.mix_weights == (100.0, 0.5)
