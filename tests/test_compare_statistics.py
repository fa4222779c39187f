"""The comparison's statistics on generated per-example outcomes: the paired bootstrap interval finds a known
difference, rarely a difference where there is none, is narrower than an unpaired one when the methods get the
same examples right, widens with seed-to-seed variation, and is reproducible; mean and std over seeds are exact."""

import itertools

import numpy as np
import pytest

from comparison import statistics
from comparison.statistics import Outcomes


def correct_outcomes(correct):
    """Outcomes of (seeds, examples) 1/0 outcomes."""
    correct = np.asarray(correct, dtype=np.int64)
    return Outcomes(correct[:, None, :], np.ones((1, correct.shape[-1]), dtype=np.int64))


def width(difference):
    return difference["high"] - difference["low"]


def test_mean_and_sample_std_over_seeds_are_exact():
    assert statistics.spread([0.5, 0.7, 0.6]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "seeds": 3}
    assert statistics.spread([0.25]) == {"mean": 0.25, "std": None, "seeds": 1}
    assert correct_outcomes([[1, 1, 0, 0], [1, 1, 1, 0]]).seed_values().tolist() == [0.5, 0.75]


def test_a_known_difference_is_inside_the_interval_and_0_is_not():
    rng = np.random.default_rng(0)
    better, worse = rng.random((2, 1, 2000)) < np.array([0.7, 0.5])[:, None, None]
    difference = statistics.paired_differences({"a": correct_outcomes(better), "b": correct_outcomes(worse)}, "b")["a"]
    assert difference["low"] < 0.2 < difference["high"] and difference["low"] > 0
    assert difference["distinguishable"] and difference["noise"] == "examples only"
    assert difference["difference"] == pytest.approx(better.mean() - worse.mean())


def test_methods_that_are_alike_are_rarely_told_apart():
    """20 comparisons of two methods right with the same probability: a 95% interval includes 0 about 19 times."""
    rng = np.random.default_rng(1)
    included = 0
    for _ in range(20):
        first, second = rng.random((2, 1, 1000)) < 0.6
        difference = statistics.paired_differences({"a": correct_outcomes(first), "b": correct_outcomes(second)},
                                                   "b", draws=500)["a"]
        included += not difference["distinguishable"]
    assert included >= 16


def test_pairing_narrows_the_interval_when_the_methods_get_the_same_examples_right():
    rng = np.random.default_rng(2)
    hardness = rng.random((1, 2000))  # an example easy for one method is easy for the other
    better, worse = correct_outcomes(hardness < 0.7), correct_outcomes(hardness < 0.6)
    paired = statistics.paired_differences({"a": better, "b": worse}, "b")["a"]
    unpaired = statistics.bootstrap_values({"a": better}, rng_seed=1)["a"] - \
        statistics.bootstrap_values({"b": worse}, rng_seed=2)["b"]  # each method's examples drawn on their own
    assert width(paired) < 0.6 * (np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025))
    assert paired["low"] < 0.1 < paired["high"]


def test_seed_to_seed_variation_widens_the_interval():
    rng = np.random.default_rng(3)
    steady = rng.random((3, 2000)) < 0.6
    erratic = np.stack([rng.random(2000) < accuracy for accuracy in (0.45, 0.6, 0.75)])
    reference = correct_outcomes(rng.random((3, 2000)) < 0.6)
    steady_interval = statistics.paired_differences({"a": correct_outcomes(steady), "ref": reference}, "ref")["a"]
    erratic_interval = statistics.paired_differences({"a": correct_outcomes(erratic), "ref": reference}, "ref")["a"]
    assert width(erratic_interval) > 2 * width(steady_interval)
    assert steady_interval["noise"] == "examples and seeds"


def test_intervals_are_reproducible_and_do_not_depend_on_the_other_methods():
    rng = np.random.default_rng(4)
    outcomes = {name: correct_outcomes(rng.random((2, 500)) < 0.5) for name in ("a", "b", "ref")}
    both = statistics.paired_differences(outcomes, "ref")
    assert statistics.paired_differences(outcomes, "ref") == both
    assert statistics.paired_differences({"a": outcomes["a"], "ref": outcomes["ref"]}, "ref")["a"] == both["a"]


def test_a_method_evaluated_on_other_examples_is_not_paired():
    rng = np.random.default_rng(5)
    outcomes = {"a": correct_outcomes(rng.random((1, 300)) < 0.5),
                "ref": correct_outcomes(rng.random((1, 400)) < 0.5)}
    assert statistics.paired_differences(outcomes, "ref") == \
        {"a": {"not_paired": "evaluated on 300 examples, ref on 400"}}


def test_a_ratio_metric_resamples_whole_units():
    """Text→image recall per image: hits among its captions over its captions. A draw's value is the pooled ratio
    of three whole images drawn with replacement (never a caption without its image)."""
    hits, captions = np.array([2, 0, 1]), np.array([2, 1, 3])
    outcomes = Outcomes(hits[None, None, :], captions[None, :])
    assert outcomes.seed_values().tolist() == [pytest.approx(3 / 6)]
    pooled = {round(hits[list(units)].sum() / captions[list(units)].sum(), 9)
              for units in itertools.combinations_with_replacement(range(3), 3)}
    drawn = statistics.bootstrap_values({"a": outcomes}, draws=200)["a"]
    assert {round(value, 9) for value in drawn} <= pooled
