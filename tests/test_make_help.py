"""`make` with no target prints the help (it never builds the environment); the help names every target; a mistyped
variable on the command line stops make with the closest known name."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tools.closest_name import unknown_variable_lines

REPO = Path(__file__).parents[1]
MAKEFILE = (REPO / "Makefile").read_text()


def make(*words):
    return subprocess.run(["make", "--no-print-directory", *words], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={key: value for key, value in os.environ.items()
                                           if key not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")})


def makefile_targets():
    return set(re.findall(r"^([a-z][a-z-]*):(?!=)", MAKEFILE, re.M))


@pytest.mark.parametrize("words", [(), ("help",)], ids=["no target", "help"])
def test_make_help_lists_every_target_and_builds_nothing(words):
    result = make("-n", *words) if not words else make(*words)
    if not words:  # a dry run shows what `make` alone would do: print the help, nothing else
        assert result.returncode == 0 and "pip install" not in result.stdout, result.stdout
        result = make()
    assert result.returncode == 0, result.stderr
    targets_section = result.stdout.split("Targets:\n")[1].split("\n\n")[0]
    listed = set(re.findall(r"^  ([a-z][a-z-]*) ", targets_section, re.M))
    assert listed == makefile_targets()
    phony = set(re.search(r"^\.PHONY: (.*)$", MAKEFILE, re.M).group(1).split())
    assert phony == makefile_targets()


def test_help_names_every_variable_a_user_sets():
    user_variables = re.search(r"^USER_VARIABLES := ((?:.*\\\n)*.*)$", MAKEFILE, re.M).group(1)
    help_text = make("help").stdout
    retired = {"ARGS"}  # kept only to say it is split in DOWNLOAD_ARGS and SHARDS_ARGS
    missing = [name for name in set(user_variables.replace("\\", " ").split()) - retired
               if not re.search(rf"\b{name}\b", help_text)]
    assert not missing


@pytest.mark.parametrize(("word", "closest"), [("CONFG=clip", "CONFIG"), ("TRAIN_ARG=x", "TRAIN_ARGS"),
                                                ("nproc=2", "NPROC")])
def test_a_mistyped_variable_names_the_closest_one(word, closest):
    result = make("pretrain", word)
    assert result.returncode == 2 and not result.stdout
    assert f"{word.split('=')[0]} is not a variable of this Makefile: did you mean {closest}?" in result.stderr


def test_a_name_close_to_none_says_so():
    assert unknown_variable_lines(["XYZZY"], ["CONFIG", "RUN"]) == [
        "XYZZY is not a variable of this Makefile: it is none of the variables (`make help` lists them)"]
