"""Values of make variables reach the programs as data: shell metacharacters in them run nothing."""

import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
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
    shell ran it (make hands it on as written, `$` included)."""
    first, second, third = markers
    return f"x`touch {first}`;touch {second};$(touch {third})"


def run_make(*words):
    return subprocess.run(["make", "--no-print-directory", *words], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CI": os.environ.get("CI", "")})


@pytest.fixture
def markers(tmp_path):
    paths = [tmp_path / f"ran-{number}" for number in range(3)]
    yield paths
    assert not any(path.exists() for path in paths), "a make variable was run as shell code"


def test_url_list_file_name_is_data(tmp_path, markers):
    name = hostile(markers)  # the file's real name
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


def fake_python(folder):
    """A stand-in for .venv/bin/python (make's PY) and for python3: `-m tools.make_args` runs the real make_args,
    and every other command appends its arguments, as a JSON list, to folder/argv.jsonl and succeeds. Returns
    (the script, a function reading back the commands it received)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "argv.jsonl"
    script = folder / "python3"
    record = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + chr(10))"
    real = shlex.quote(sys.executable)
    script.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m tools.make_args" ]; then exec {real} "$@"; fi\n'
                      f'exec {real} -c {shlex.quote(record)} {shlex.quote(str(log))} "$@"\n')
    script.chmod(0o755)
    return script, lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def contains(words, part):
    return any(words[start:start + len(part)] == part for start in range(len(words) - len(part) + 1))


ARGS_VARIABLES = {"DOWNLOAD_ARGS", "SHARDS_ARGS", "TORCHRUN_ARGS", "TRAIN_ARGS", "PYTEST_ARGS"}
# target, the variables given hostile values, plain values for others it needs, and make's options
CASES = {
    "download": ("download", ["DATASET", "URL_LIST", "RAW", "PROCESSES", "THREADS", "DISTRIBUTOR", "DOWNLOAD_ARGS"],
                 {}, []),
    "download-staging": ("download", ["STAGING"], {"RAW": "s3://bucket/raw", "URL_LIST": "list.tsv"}, []),
    "shards": ("shards", ["OUT", "SAMPLES_PER_SHARD", "EXCLUDE", "SHARDS_ARGS"], {}, []),
    "shards-spark": ("shards", ["SPARK_MASTER"], {"DISTRIBUTOR": "pyspark"}, []),
    "pretrain": ("pretrain", ["CONFIG", "NPROC", "TORCHRUN_ARGS", "RUN", "TRAIN_ARGS", "TRAIN_SHARDS", "MIX_WEIGHTS"],
                 {}, []),
    "eval": ("eval", ["RUN", "ZEROSHOT_DATA", "ZEROSHOT_LABELS", "TEMPLATES", "RETRIEVAL_DATA", "RETRIEVAL_IMAGES",
                      "PROBE_TRAIN", "PROBE_TEST", "PROBE_TRAIN_LABELS", "PROBE_TEST_LABELS", "EVAL_DEVICE"], {}, []),
    "eval-data": ("eval", ["EVAL_DATA"], {}, []),
    "compare": ("compare", ["METHODS", "BUDGET", "SCALE", "COMPARE_NAME", "EVAL_POINTS", "SEEDS", "REFERENCE",
                            "COMPARE_EXECUTOR", "SLURM_ARGS", "COMPARE_PUBLISH"], {"TRAIN_SHARDS": "shards"}, []),
    "bench-scale": ("bench-scale", ["N"], {}, []),
    "test": ("test", ["PYTEST_ARGS"], {}, []),
    "gpu-check": ("gpu-check", ["OUT_DIR"], {}, []),
    "setup": ("setup", ["PYTHON"], {}, ["-W", "pyproject.toml"]),  # -W: the venv looks out of date
    "args": ("download", ["ARGS"], {}, []),
}


def expected_words(name, value, target):
    """The words of the program's command line that carry `value`, given as make variable `name`."""
    if name in ARGS_VARIABLES:
        return shlex.split(value)
    if (name, target) == ("RUN", "eval"):
        return ["--run", value]
    return {"RUN": [f"run.out_dir={posixpath.dirname(value)}", f"run.name={posixpath.basename(value)}"],
            "OUT": [f"{value}/raw", f"{value}/train"], "NPROC": [f"--nproc_per_node={value}"],
            "TRAIN_SHARDS": [f"data.shards={value}"], "MIX_WEIGHTS": [f"data.mix_weights={value}"],
            "EVAL_DATA": ["--zeroshot", f"{value}/heldout"]}.get(name, [value])


@pytest.mark.parametrize("origin", ["command line", "environment"])
@pytest.mark.parametrize("case", CASES)
def test_every_variable_reaches_the_program_as_written(tmp_path, case, origin):
    """`$(shell ...)`, `$USER` and `$$` in a value given on make's command line or in its environment are neither
    expanded by make nor run by the shell: the program receives the value byte for byte."""
    target, names, plain, options = CASES[case]
    (tmp_path / "markers").mkdir()
    values = {name: f"{tmp_path}/{name}:$(shell touch {tmp_path}/markers/{name}) $USER $$ ${{HOME}}"
              for name in names}
    if "EVAL_DATA" in values:
        (Path(values["EVAL_DATA"]) / "heldout").mkdir(parents=True)
    python, commands = fake_python(tmp_path / "bin")
    given = {"OUT": str(tmp_path / "out"), **plain, **values}
    settings = [f"{name}={value}" for name, value in given.items()]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    environment["PATH"] = f"{python.parent}:{environment['PATH']}"  # make gpu-check's python3
    if origin == "environment":
        environment.update(given)
        settings = []
    done = subprocess.run(["make", "--no-print-directory", *options, target, f"PY={python}", *settings], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=environment)
    assert not list((tmp_path / "markers").iterdir()), "make or the shell ran a value"
    output = done.stdout + done.stderr
    if case == "args":
        assert done.returncode != 0 and "ARGS is split in two" in done.stderr, output
        return
    if case == "setup":
        assert done.returncode != 0 and f"error: {values['PYTHON']} not found;" in output, output
        return
    assert done.returncode == 0, output
    received = commands()
    assert received, output
    for name, value in values.items():
        for word in expected_words(name, value, target):
            assert any(word in argv for argv in received), (name, word, received)
        if name in ARGS_VARIABLES:
            assert any(contains(argv, shlex.split(value)) for argv in received), (name, received)


def test_the_echoed_command_is_the_one_that_runs(tmp_path):
    """make's echo of a recipe line shows the command that runs, values and all: no {NAME_ARGS} placeholder, no
    "$RAW"; `make -s` shows none."""
    python, commands = fake_python(tmp_path / "bin")
    settings = ["DATASET=cc3m", "URL_LIST=my list.tsv", f"OUT={tmp_path}/out", "DOWNLOAD_ARGS=--timeout 20 --a 'b c'"]
    done = subprocess.run(["make", "--no-print-directory", "download", f"PY={python}", *settings], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [argv] = commands()
    assert argv[-4:] == ["--timeout", "20", "--a", "b c"] and f"{tmp_path}/out/raw" in argv
    assert done.stdout.splitlines() == [shlex.join([str(python), *argv])]
    silent = subprocess.run(["make", "-s", "--no-print-directory", "download", f"PY={python}", *settings], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert silent.returncode == 0 and silent.stdout == "", silent.stdout + silent.stderr


def test_make_args_prints_the_command_it_runs(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(os, "execvp", lambda program, words: ran.append(words))
    monkeypatch.setenv("DOWNLOAD_ARGS", "--user_agent_token 'a b' $HOME")
    monkeypatch.setenv("MAKEFLAGS", " -- X=1")
    make_args.main(["prog", "--out", "my dir", "{DOWNLOAD_ARGS}"])
    assert ran == [["prog", "--out", "my dir", "--user_agent_token", "a b", "$HOME"]]
    assert capsys.readouterr().out == "prog --out 'my dir' --user_agent_token 'a b' '$HOME'\n"
    monkeypatch.setenv("MAKEFLAGS", "ks -- X=1")  # make -s -k
    make_args.main(["prog"])
    assert capsys.readouterr().out == ""


def test_make_pretrain_refuses_a_run_folder_in_train_args(tmp_path):
    """make eval and make plot read RUN: a run named in TRAIN_ARGS would be trained while they read another."""
    python, commands = fake_python(tmp_path / "bin")
    done = subprocess.run(["make", "--no-print-directory", "pretrain", f"PY={python}", "TRAIN_SHARDS=shards",
                           "RUN=runs/demo", "TRAIN_ARGS=optim.lr=1 run.name=X"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and commands() == [], done.stdout + done.stderr
    assert done.stderr.splitlines()[0] == ("error: TRAIN_ARGS sets run.name, which make sets from RUN; give "
                                           "RUN=runs/X instead (and not in TRAIN_ARGS), so that make eval and make "
                                           "plot use the same run")


def test_a_run_folder_in_train_args_is_refused_only_where_the_command_sets_it():
    environment = {"RUN": "runs/demo", "TRAIN_ARGS": "run.out_dir=/scratch/r 'run.name=a b'"}
    with pytest.raises(SystemExit, match=r"sets run.out_dir and run.name, which make sets from RUN; give "
                                         r"RUN='/scratch/r/a b' instead"):
        make_args.expand(["train", "run.out_dir=runs", "run.name=demo", "{TRAIN_ARGS}"], environment)
    assert make_args.expand(["compare", "--train-args", "{TRAIN_ARGS}"], environment) == [
        "compare", "--train-args", "run.out_dir=/scratch/r", "run.name=a b"]


@pytest.mark.parametrize("under_make, choices", [
    (True, "(RUN=runs/<name> or TRAIN_ARGS=run.resume=none)"), (False, "(run.name=... or run.resume=none)")])
def test_a_refused_resume_suggests_a_new_run_the_way_it_was_started(monkeypatch, under_make, choices):
    """Under make, run.name= in TRAIN_ARGS is refused: the trainer's message names RUN there."""
    import dataclasses
    from types import SimpleNamespace

    from model.model_config import ModelConfig
    from train.config import TrainConfig, to_dict
    from train.pretrain import reconcile_with_checkpoint

    monkeypatch.delenv("MAKELEVEL", raising=False)
    if under_make:
        monkeypatch.setenv("MAKELEVEL", "0")
    saved = TrainConfig(model=ModelConfig(objectives={"clip": {}}))  # the defaults name no objective: CLIP's
    state = {"config": json.dumps(to_dict(saved)), "loader": {"global_batch_size": saved.data.batch_size}}
    config = dataclasses.replace(saved, optim=dataclasses.replace(saved.optim, lr=saved.optim.lr * 2))
    with pytest.raises(ValueError, match=r"would not continue .*start a new run " + re.escape(choices)):
        reconcile_with_checkpoint(config, state, SimpleNamespace(world_size=1, is_main=True))
