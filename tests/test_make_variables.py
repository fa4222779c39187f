"""Values of make variables reach the programs as data: shell metacharacters in them run nothing."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_training_shards
from PIL import Image

from tools import make_args

REPO = Path(__file__).parents[1]


def hostile(markers):
    """A value with a backtick command, `;` and `$(...)`, each of which would create one of `markers` if a
    shell ran it. `$$` because make reads `$(` in a value as a variable of its own: `$$(` reaches the shell."""
    first, second, third = markers
    return f"x`touch {first}`;touch {second};$$(touch {third})"


def run_make(*words):
    return subprocess.run(["make", "--no-print-directory", *words], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CI": os.environ.get("CI", "")})


@pytest.fixture
def markers(tmp_path):
    paths = [tmp_path / f"ran-{number}" for number in range(3)]
    yield paths
    assert not any(path.exists() for path in paths), "a make variable was run as shell code"


def test_url_list_file_name_is_data(tmp_path, markers):
    name = hostile(markers).replace("$$", "$")  # the file's real name
    url_list = Path(f"{tmp_path}/{name}.tsv")  # the markers' slashes make folders of parts of it
    url_list.parent.mkdir(parents=True)
    url_list.write_text("")
    done = run_make("download", "DATASET=cc3m", f"URL_LIST={tmp_path}/{hostile(markers)}.tsv", f"OUT={tmp_path}/out")
    assert done.returncode != 0 and f"url list '{url_list}' is empty" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("target, variable, expected", [
    ("download", "DOWNLOAD_ARGS", "unexpected argument 'x`touch'"),
    ("shards", "SHARDS_ARGS", "unrecognized arguments: --allow-schemes http x`touch"),
])
def test_args_variables_are_split_into_words_not_run(tmp_path, markers, target, variable, expected):
    done = run_make(target, "DATASET=cc3m", f"URL_LIST={tmp_path}/list.tsv", f"OUT={tmp_path}/out",
                    f"EXCLUDE={tmp_path}/{hostile(markers)}", f"{variable}=--allow-schemes http {hostile(markers)}")
    assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]


def test_train_args_and_run_folder_are_data(tmp_path, markers):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "00000_stats.json").write_text("{}")  # `make data` finds them: no download, no shards
    (out / "train").mkdir()
    (out / "train" / "manifest.json").write_text("{}")
    done = run_make("pretrain", f"OUT={out}", f"RUN={tmp_path}/{hostile(markers)}", f"TRAIN_ARGS={hostile(markers)}")
    assert done.returncode != 0 and "x`touch" in done.stdout + done.stderr, done.stderr[-2000:]


def test_args_are_split_with_shell_quoting():
    environment = {"DOWNLOAD_ARGS": "--user_agent_token 'a b' --disallowed_header_directives '[]' `x`;y"}
    assert make_args.expand(["prog", "{DOWNLOAD_ARGS}", "{TRAIN_ARGS}", "{raw}"], environment) == [
        "prog", "--user_agent_token", "a b", "--disallowed_header_directives", "[]", "`x`;y", "{raw}"]
    with pytest.raises(SystemExit, match="DOWNLOAD_ARGS cannot be split into words .*close the quote"):
        make_args.expand(["{DOWNLOAD_ARGS}"], {"DOWNLOAD_ARGS": "--user_agent_token 'a"})


def test_make_data_on_the_demo_excludes_the_splits_its_download_made(tmp_path):
    """The demo's EXCLUDE names held-out splits that `make download` creates within the same `make data`: the
    shards sub-make must work it out again, not inherit the empty value of before the download."""
    out = tmp_path / "demo"
    done = run_make("data", f"OUT={out}", "SAMPLES_PER_SHARD=20", "DOWNLOAD_ARGS=--demo-size 30 --processes 1")
    assert done.returncode == 0, done.stderr[-2000:]
    excluded = json.loads((out / "train" / "manifest.json").read_text())["exclude"]
    assert sorted(Path(entry["path"]).name for entry in excluded) == ["heldout", "heldout_pairs", "probe_train"]


def test_make_compare_hands_its_variables_to_the_comparison(tmp_path):
    out = tmp_path / "data"
    write_training_shards(out / "train", np.zeros((4, 32, 32, 3), dtype=np.uint8), samples_per_shard=4)
    (out / "raw").mkdir()
    (out / "raw" / "00000_stats.json").write_text("{}")  # `make data` finds the data there
    classes = tmp_path / "zeroshot"
    for name in ("red", "blue"):
        (classes / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), name).save(classes / name / "0.jpg")
    done = run_make("compare", "DATASET=demo", f"OUT={out}", "METHODS=clip no_such_method", "EXCLUDE=",
                    f"ZEROSHOT_DATA={classes}")
    assert done.returncode != 0 and "METHODS: no preset for no_such_method" in done.stderr, done.stderr[-2000:]
    if not torch.cuda.is_available():
        done = run_make("compare", "DATASET=demo", f"OUT={out}", "METHODS=clip", "EXCLUDE=",
                        f"ZEROSHOT_DATA={classes}", "EVAL_DEVICE=cuda")
        assert done.returncode != 0 and "--device cuda: this machine has no CUDA device" in done.stderr


@pytest.mark.parametrize("target", ["pretrain", "compare"])
def test_train_shards_and_mix_weights_reach_the_config_check(tmp_path, target):
    """A mixture given as TRAIN_SHARDS is read as it is (`make data` builds nothing for DATASET=cc3m, which has no
    URL_LIST here) and its weights reach the check, which counts the sets."""
    sets = [write_training_shards(tmp_path / name, np.zeros((4, 32, 32, 3), dtype=np.uint8), samples_per_shard=4)
            for name in ("a", "b")]
    done = run_make(target, "DATASET=cc3m", f"OUT={tmp_path}/nothing", f"TRAIN_SHARDS=[{sets[0]}, {sets[1]}]",
                    "MIX_WEIGHTS=[1, 2, 3]", "METHODS=clip", "ZEROSHOT_DATA=", f"RETRIEVAL_DATA={sets[0]}",
                    f"RUN={tmp_path}/run")
    assert done.returncode != 0, done.stderr[-2000:]
    assert "data.mix_weights has 3 weight(s) for 2 shard set(s)" in done.stderr, done.stderr[-2000:]


def test_make_test_hands_pytest_none_of_its_defaults(tmp_path):
    """CI runs `make test`: the suite's own `make download OUT=...` must not inherit this make's RAW (its
    `RAW ?= $(OUT)/raw` would keep shards/demo/raw) nor its level (`make[1]:` instead of `make:`)."""
    probe = tmp_path / "test_environment_probe.py"
    probe.write_text("import os\n\n\ndef test_environment():\n"
                     "    leaked = sorted({'RAW', 'OUT', 'EXCLUDE', 'MAKELEVEL', 'MAKEFLAGS'} & set(os.environ))\n"
                     "    assert not leaked, leaked\n")
    done = run_make("test", f"PYTEST_ARGS=-q -p no:cacheprovider --rootdir {tmp_path} {probe}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
    assert "1 passed" in done.stdout
