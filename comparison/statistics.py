"""Which differences between methods are noise: mean and spread over seeds, and a paired bootstrap interval of each
method's difference to a reference.

A metric's outcomes (comparison.metrics) are, per seed, per-unit sums over per-unit counts: sums (seeds,
components, units), counts (components, units); a seed's value is the mean over components of
sum(sums) / sum(counts) (for an accuracy: the fraction of examples right). Every method is evaluated on the same
units in the same order, which is what makes the comparison paired.

The interval (paired_differences): DRAWS bootstrap draws, each of which
1. resamples the units (evaluation examples) with replacement: the SAME units for every method, so that how hard
   the drawn examples are cancels out of the difference (a paired bootstrap: narrower than resampling each method's
   examples on its own whenever the methods tend to get the same examples right);
2. resamples each method's seeds with replacement, independently per method (seed k of one method is not paired with
   seed k of another: they share a number, not a model), and averages the method's values over the drawn seeds.
The interval is the 2.5th to 97.5th percentile of the drawn differences (method minus reference); the point
estimate is the difference of the seed means on every example. An interval that excludes 0 is "distinguishable".
Resampling both seeds and examples counts each seed's example noise twice, which makes the interval slightly wide
(conservative); with few seeds the seed level is itself rough (a bootstrap of K values has (K-1)/K of their
variance), and with one seed per method the interval covers example noise only, not training noise.
The draws come from a fixed RNG seed (the units' resampling) and one per method derived from its name (its seeds'
resampling), so a report is reproducible and a method's interval does not depend on which others are compared.
"""

import dataclasses
import zlib

import numpy as np

DRAWS = 2000
RNG_SEED = 0
CONFIDENCE = 0.95
DRAW_ELEMENTS = 1 << 22  # units x draws resampled at once (16 MiB of float32 weights)


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """One method's per-example outcomes of one metric."""
    sums: np.ndarray  # (seeds, components, units)
    counts: np.ndarray  # (components, units), the same for every seed

    def seed_values(self):
        """(seeds,) the metric of each seed on every unit."""
        return (self.sums.sum(axis=-1) / self.counts.sum(axis=-1)).mean(axis=-1)


def spread(values):
    """{"mean", "std" (sample, n-1; None for one value), "seeds"} of a metric's per-seed values."""
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "seeds": len(values)}


def unit_weights(rng, draws, units):
    """(draws, units) float32: how many times each unit is drawn in each of `draws` resamplings with replacement."""
    picks = rng.integers(0, units, size=(draws, units)) + units * np.arange(draws)[:, None]  # (draws, units)
    return np.bincount(picks.ravel(), minlength=draws * units).reshape(draws, units).astype(np.float32)


def outcome_columns(outcomes):
    """(units, columns) float32: every method's sums (seeds x components columns), then its counts (components)."""
    columns = [array.reshape(-1, array.shape[-1]) for method_outcomes in outcomes.values()
               for array in (method_outcomes.sums, method_outcomes.counts)]
    return np.ascontiguousarray(np.concatenate(columns).T, dtype=np.float32)


def split_totals(outcomes, totals):
    """{method: (sums (draws, seeds, components), counts (draws, components))} of resampled totals (draws, columns)
    laid out as outcome_columns'."""
    split = {}
    for method, method_outcomes in outcomes.items():
        seeds, components, _ = method_outcomes.sums.shape
        sums, totals = totals[:, :seeds * components], totals[:, seeds * components:]
        counts, totals = totals[:, :components], totals[:, components:]
        split[method] = sums.reshape(len(sums), seeds, components), counts
    return split


def seed_averaged(sums, counts, seed_rng):
    """(draws,) the value of each draw's totals (split_totals'), averaged over seeds drawn with replacement."""
    draws, seeds, _ = sums.shape
    per_seed = (sums / counts[:, None, :]).mean(axis=-1)  # (draws, seeds)
    drawn = seed_rng.integers(0, seeds, size=(draws, seeds))  # (draws, seeds)
    return np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)


def bootstrap_values(outcomes, draws=DRAWS, rng_seed=RNG_SEED):
    """{method: (draws,) its value in each bootstrap draw} of {method: Outcomes} on the same units: every method
    sees the same resampled units (paired). A chunk of draws at a time, all methods in one float32 matrix product
    (whole numbers, exact while a resampled total stays under 2**24)."""
    units = _same_units(outcomes)
    columns = outcome_columns(outcomes)  # (units, columns)
    unit_rng = np.random.default_rng(rng_seed)
    seed_rngs = {method: np.random.default_rng([rng_seed, zlib.crc32(method.encode())]) for method in outcomes}
    chunk = max(1, DRAW_ELEMENTS // units)
    parts = {method: [] for method in outcomes}
    for start in range(0, draws, chunk):
        totals = unit_weights(unit_rng, min(chunk, draws - start), units) @ columns  # (chunk, columns)
        for method, (sums, counts) in split_totals(outcomes, totals.astype(np.float64)).items():
            parts[method].append(seed_averaged(sums, counts, seed_rngs[method]))
    return {method: np.concatenate(values) for method, values in parts.items()}


def _same_units(outcomes):
    units = {method: method_outcomes.counts.shape[-1] for method, method_outcomes in outcomes.items()}
    if len(set(units.values())) != 1:
        raise ValueError(f"methods evaluated on different numbers of examples ({units}): a paired comparison needs "
                         "the same evaluation sets; evaluate them on the same data")
    return next(iter(units.values()))


def interval(observed, drawn_differences, confidence=CONFIDENCE):
    """The difference's point estimate, its percentile interval and whether the interval excludes 0."""
    low, high = np.quantile(drawn_differences, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"difference": float(observed), "low": float(low), "high": float(high),
            "distinguishable": bool(low > 0 or high < 0)}


def paired_differences(outcomes, reference, draws=DRAWS, rng_seed=RNG_SEED):
    """{method: interval of its value minus the reference's, with "seeds", "reference_seeds", "examples" and
    "noise" (what the interval covers)} for every method of {method: Outcomes} but the reference; methods evaluated
    on other examples than the reference get {"not_paired": why} instead."""
    units = outcomes[reference].counts.shape[-1]
    paired = {method: method_outcomes for method, method_outcomes in outcomes.items()
              if method_outcomes.counts.shape[-1] == units}
    drawn = bootstrap_values(paired, draws, rng_seed)
    reference_value = outcomes[reference].seed_values().mean()
    reference_seeds = len(outcomes[reference].sums)
    differences = {}
    for method, method_outcomes in outcomes.items():
        if method == reference:
            continue
        if method not in paired:
            differences[method] = {"not_paired": f"evaluated on {method_outcomes.counts.shape[-1]} examples, "
                                                 f"{reference} on {units}"}
            continue
        seeds = len(method_outcomes.sums)
        differences[method] = {
            **interval(method_outcomes.seed_values().mean() - reference_value, drawn[method] - drawn[reference]),
            "seeds": seeds, "reference_seeds": reference_seeds, "examples": units,
            "noise": "examples only" if seeds == reference_seeds == 1 else "examples and seeds"}
    return differences
