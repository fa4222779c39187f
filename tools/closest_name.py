"""`make`'s check of its command line: each variable it does not know, named with the closest known one.

    python3 -m tools.closest_name "CONFG TRAIN_ARG" CONFIG TRAIN_ARGS ...

Prints one line per unknown name (the Makefile stops with it); standard library only, so it runs before the
environment exists.
"""

import difflib
import sys


def unknown_variable_lines(unknown, known):
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "it is none of the variables"
        lines.append(f"{name} is not a variable of this Makefile: {hint} (`make help` lists them)")
    return lines


def main():
    unknown, known = sys.argv[1].split(), sys.argv[2:]
    print("; ".join(unknown_variable_lines(unknown, known)))


if __name__ == "__main__":
    main()
