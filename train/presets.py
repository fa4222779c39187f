"""The methods there are, found from the presets: `train/configs/<method>_<scale>.yaml`. make compare, the
benchmarks and the tests list methods through here, so a method joins everything by adding its presets; nothing
here names methods, except that the project's own method, Harmony, has the plain presets (`demo.yaml` is Harmony
at demo scale) until it has `harmony_<scale>.yaml` presets of its own.
"""

from train.config import PRESETS

PLAIN_PRESET_METHOD = "harmony"  # demo.yaml: the project's method under the scale's own name


def discover(scale="demo"):
    """{method: preset name} of every method with a preset at `scale`, sorted by method."""
    suffix = f"_{scale}"
    methods = {path.stem[:-len(suffix)]: path.stem for path in PRESETS.glob(f"*{suffix}.yaml")}
    if PLAIN_PRESET_METHOD not in methods and (PRESETS / f"{scale}.yaml").is_file():
        methods[PLAIN_PRESET_METHOD] = scale
    return dict(sorted(methods.items()))


def resolve(names, scale="demo"):
    """{method: preset} for the methods named (all that exist when none are); an unknown one is refused."""
    found = discover(scale)
    if not names:
        if not found:
            raise ValueError(f"no presets at scale {scale!r} in {PRESETS} (<method>_{scale}.yaml)")
        return found
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"METHODS: no preset for {', '.join(unknown)} at scale {scale!r} (looked for "
                         f"{', '.join(f'{name}_{scale}.yaml' for name in unknown)} in {PRESETS}); methods with "
                         f"presets: {', '.join(found) or 'none'}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"METHODS names {', '.join(duplicated)} twice")
    return {name: found[name] for name in names}
