"""Valid ranges of numeric settings, declared next to a config dataclass's fields and checked by one function.

    patch_size: int = ranged(16, "[1, inf)")
    betas: tuple[float, float] = ranged((0.9, 0.98), "[0, 1)")  # each item
    global_crop_scale: tuple[float, float] = ranged((0.32, 1.0), "[0, 1]", "(0, 1]")  # one range per item

A range is an interval: [ and ] include the end, ( and ) leave it out, inf is no end; a value outside it, or a
float that is not finite, is a ValueError of one line naming the setting, its value and the range. A class may
also list `ORDERED = ("global_crop_scale", ("min_lr", "lr"), ...)`: pairs of settings, and settings that hold a
pair, whose values must not decrease in that order.
"""

import math
import re
from dataclasses import dataclass, field, fields

INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_included: bool
    high_included: bool

    @classmethod
    def parse(cls, interval):
        """Range of "[0, 1)"-style text."""
        match = INTERVAL.match(interval)
        if not match:
            raise ValueError(f"range {interval!r} is not an interval such as [0, 1) or (0, inf)")
        opening, low, high, closing = match.groups()
        return cls(float(low), float(high), opening == "[", closing == "]")

    def holds(self, value):
        above_low = value >= self.low if self.low_included else value > self.low
        below_high = value <= self.high if self.high_included else value < self.high
        return math.isfinite(value) and above_low and below_high

    def __str__(self):
        """The range in words: "at least 1", "from 0 to 1", "above 0 and below 1"."""
        low = _number(self.low)
        high = _number(self.high)
        low_words = f"at least {low}" if self.low_included else f"above {low}"
        high_words = f"at most {high}" if self.high_included else f"below {high}"
        if math.isinf(self.low) and math.isinf(self.high):
            return "any finite number"
        if math.isinf(self.high):
            return low_words
        if math.isinf(self.low):
            return high_words
        if self.low_included and self.high_included:
            return f"from {low} to {high}"
        return f"{low_words} and {high_words}"


def _number(value):
    return str(int(value)) if value.is_integer() else str(value)


def ranged(default, *intervals, note=""):
    """A dataclass field whose value (each item of a tuple: one interval for all, or one per item) must lie in
    `intervals`; `note` says what the setting is, for the error."""
    return field(default=default, metadata={"range": tuple(Range.parse(text) for text in intervals), "note": note})


def check_ranges(config, section=""):
    """ValueError, naming `section` + the setting, for the first value of `config` out of its declared range or
    the first `ORDERED` pair out of order."""
    for setting in fields(config):
        if "range" in setting.metadata:
            _check_value(f"{section}{setting.name}", getattr(config, setting.name), setting.metadata)
    for ordered in getattr(type(config), "ORDERED", ()):
        if isinstance(ordered, str):
            _check_pair(config, section, ordered)
        else:
            _check_order(config, section, *ordered)


def _check_value(key, value, metadata):
    ranges, note = metadata["range"], metadata["note"]
    items = value if isinstance(value, tuple | list) else (value,)
    for number, item in enumerate(items):
        allowed = ranges[number] if len(ranges) > 1 else ranges[0]
        if not allowed.holds(item):
            shown = list(value) if isinstance(value, tuple | list) else value
            which = f"item {number + 1} must be" if isinstance(value, tuple | list) else "it must be"
            finite = " finite" if not math.isfinite(item) else ""
            raise ValueError(f"{key}={shown!r} is out of range: {which} a{finite} number {allowed}"
                             f"{f' ({note})' if note else ''}")


def _check_pair(config, section, name):
    first, second = getattr(config, name)
    if first > second:
        raise ValueError(f"{section}{name}={[first, second]!r} is reversed: give [smallest, largest], the first "
                         f"at most the second")


def _check_order(config, section, lower, higher):
    if getattr(config, lower) > getattr(config, higher):
        raise ValueError(f"{section}{lower}={getattr(config, lower)!r} is above {section}{higher}="
                         f"{getattr(config, higher)!r}: {lower} must be at most {higher}")
