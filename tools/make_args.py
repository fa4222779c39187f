"""Run a command whose extra options come from make variables, as data and never as shell code.

    python -m tools.make_args .venv/bin/python -m datapipe.shards build "$RAW" out {SHARDS_ARGS}

The Makefile exports its variables to the recipe's environment and quotes them there ("$RAW"), so the
shell never reads their values as commands. A word of the form {NAME_ARGS} is replaced by the words of
the environment variable NAME_ARGS, split as a shell would split them (quotes group words; `;`, `|`,
backticks and `$(...)` are ordinary characters), then the command runs in place of this process.

The command that runs is printed first, shell-quoted, as make echoes a recipe line (whose own echo, with its
placeholders, the Makefile silences with @); `make -s` silences it too.
"""

import os
import posixpath
import re
import shlex
import sys

PLACEHOLDER = re.compile(r"\{([A-Z][A-Z_]*_ARGS)\}")
# Settings a recipe gives its program from a make variable of its own: {NAME_ARGS} may not give them again,
# or the program would use one value and the other targets (make eval, make plot) the variable's.
FROM_MAKE_VARIABLE = {"run.out_dir": "RUN", "run.name": "RUN"}


def _run_folder(environment, words):
    """RUN as it would be with the run.out_dir= and run.name= of `words` applied."""
    out_dir, name = posixpath.split(environment.get("RUN", "").rstrip("/") or "runs/<name>")
    for word in words:
        key, _, value = word.partition("=")
        if key == "run.out_dir":
            out_dir = value
        elif key == "run.name":
            name = value
    return posixpath.join(out_dir, name)


def _check_not_given_twice(name, words, command, environment):
    """Stop when the words of `name` set what `command` sets itself from a make variable (FROM_MAKE_VARIABLE)."""
    set_by_command = {word.partition("=")[0] for word in command if "=" in word}
    again = [word for word in words if word.partition("=")[0] in set_by_command.intersection(FROM_MAKE_VARIABLE)]
    if again:
        keys = " and ".join(dict.fromkeys(word.partition("=")[0] for word in again))
        variable = FROM_MAKE_VARIABLE[again[0].partition("=")[0]]
        raise SystemExit(f"error: {name} sets {keys}, which make sets from {variable}; give "
                         f"{variable}={shlex.quote(_run_folder(environment, again))} instead (and not in {name}), "
                         f"so that make eval and make plot use the same run")


def expand(words, environment):
    """`words` with each {NAME_ARGS} replaced by the shell-split words of environment[NAME_ARGS]."""
    expanded = []
    for word in words:
        match = PLACEHOLDER.fullmatch(word)
        if match is None:
            expanded.append(word)
            continue
        name = match.group(1)
        value = environment.get(name, "")
        try:
            split = shlex.split(value)
        except ValueError as error:  # an unclosed quote
            raise SystemExit(f"error: {name} cannot be split into words ({error}): {value!r}; "
                             f"close the quote, or quote a value holding spaces as '...'") from None
        _check_not_given_twice(name, split, [word for word in words if PLACEHOLDER.fullmatch(word) is None],
                               environment)
        expanded.extend(split)
    return expanded


def make_is_silent(environment):
    """Whether make runs with -s (--silent): its single-letter options are MAKEFLAGS' first word."""
    flags = environment.get("MAKEFLAGS", "").split()
    return bool(flags) and not flags[0].startswith("-") and "=" not in flags[0] and "s" in flags[0]


def main(argv=None):
    words = expand(sys.argv[1:] if argv is None else argv, os.environ)
    if not words:
        raise SystemExit("usage: python -m tools.make_args COMMAND [ARGUMENT | {NAME_ARGS}]...")
    if not make_is_silent(os.environ):
        print(shlex.join(words), flush=True)
    os.execvp(words[0], words)


if __name__ == "__main__":
    main()
