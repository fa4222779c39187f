"""The methods there are, found from the presets: `train/configs/<method>/<scale>.yaml`. make compare, the
benchmarks and the tests list methods through here, so a method joins everything by adding its presets; nothing
here names methods. The folders `base/` (a scale's towers, data and optimisation) and `ablations/` hold no method.
"""

from train.config import PRESETS

NOT_METHODS = ("base", "ablations")


def discover(scale="demo"):
    """{method: preset name} of every method with a preset at `scale`, sorted by method."""
    methods = {path.parent.name: f"{path.parent.name}/{scale}" for path in PRESETS.glob(f"*/{scale}.yaml")
               if path.parent.name not in NOT_METHODS}
    return dict(sorted(methods.items()))


def resolve(names, scale="demo"):
    """{method: preset} for the methods named (all that exist when none are); an unknown one is refused."""
    found = discover(scale)
    if not names:
        if not found:
            raise ValueError(f"no presets at scale {scale!r} in {PRESETS} (<method>/{scale}.yaml)")
        return found
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"METHODS: no preset for {', '.join(unknown)} at scale {scale!r} (looked for "
                         f"{', '.join(f'{name}/{scale}.yaml' for name in unknown)} in {PRESETS}); methods with "
                         f"presets: {', '.join(found) or 'none'}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"METHODS names {', '.join(duplicated)} twice")
    return {name: found[name] for name in names}
