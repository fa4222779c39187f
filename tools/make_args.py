"""Run a command whose extra options come from make variables, as data and never as shell code.

    python -m tools.make_args .venv/bin/python -m datapipe.shards build "$RAW" out {SHARDS_ARGS}

The Makefile exports its variables to the recipe's environment and quotes them there ("$RAW"), so the
shell never reads their values as commands. A word of the form {NAME_ARGS} is replaced by the words of
the environment variable NAME_ARGS, split as a shell would split them (quotes group words; `;`, `|`,
backticks and `$(...)` are ordinary characters), then the command runs in place of this process.
"""

import os
import re
import shlex
import sys

PLACEHOLDER = re.compile(r"\{([A-Z][A-Z_]*_ARGS)\}")


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
            expanded.extend(shlex.split(value))
        except ValueError as error:  # an unclosed quote
            raise SystemExit(f"error: {name} cannot be split into words ({error}): {value!r}; "
                             f"close the quote, or quote a value holding spaces as '...'") from None
    return expanded


def main(argv=None):
    words = expand(sys.argv[1:] if argv is None else argv, os.environ)
    if not words:
        raise SystemExit("usage: python -m tools.make_args COMMAND [ARGUMENT | {NAME_ARGS}]...")
    os.execvp(words[0], words)


if __name__ == "__main__":
    main()
