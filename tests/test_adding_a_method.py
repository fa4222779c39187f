"""docs/adding-a-method.md works as written: its example objective and preset, copied into a scratch copy of the
project with nothing else edited, train, join `make compare`'s methods and the config reference, and refuse a
mistyped setting in one line."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_training_shards

REPO = Path(__file__).parents[1]
GUIDE = REPO / "docs" / "adding-a-method.md"
EXAMPLE = re.compile(r"<!-- example file: (\S+) -->\n```\w+\n(.*?)```", re.DOTALL)
TINY = ["model.vit_size=micro", "model.patch_size=8", "model.global_crop_px=32", "model.clip_dim=32",
        "model.text_width=64", "model.text_layers=2", "model.text_heads=4", "data.global_crop_px=32",
        "data.batch_size=8", "data.num_workers=0", "data.backend=torch", "run.precision=fp32", "run.log_every=1"]


def example_files():
    return dict(EXAMPLE.findall(GUIDE.read_text()))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the project's tracked code and presets with the guide's two files added."""
    root = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if name.endswith((".py", ".yaml")) and not name.startswith(("tests/", "docs/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for name, content in example_files().items():
        assert not (root / name).exists(), f"the guide's {name} would replace a file of the project"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def run_in(root, *arguments):
    return subprocess.run([sys.executable, *arguments], cwd=root, capture_output=True, text=True, timeout=600)


def test_the_guide_shows_one_objective_file_under_150_lines_and_one_preset():
    files = example_files()
    assert sorted(files) == ["model/objectives/clip_l2.py", "train/configs/clip_l2/demo.yaml"]
    assert len(files["model/objectives/clip_l2.py"].splitlines()) < 150


def test_the_example_trains_and_logs_its_terms(scratch, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
    shards = write_training_shards(tmp_path / "shards", images, samples_per_shard=16)
    done = run_in(scratch, "-m", "train.pretrain", "--config", "clip_l2/demo", *TINY, f"data.shards={shards}",
                  f"run.out_dir={tmp_path / 'runs'}", "run.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = tmp_path / "runs" / "clip_l2_demo" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["clip_l2"]) and row["clip_l2_penalty"] > 0 for row in rows)


FIND_AND_CHECK = """
from train.config import load_config
from train.config_reference import reference
from train.presets import resolve

print(resolve(["clip", "clip_l2"]))
print("| `model.objectives.clip_l2.l2_weight` | float | `0.01` | at least 0 |" in reference())
try:
    load_config("clip_l2/demo", ["model.objectives.clip_l2.l2_wieght=1"])
except ValueError as error:
    print(error)
"""


def test_make_compare_and_the_config_reference_find_it_and_a_mistyped_setting_names_the_closest(scratch):
    found = run_in(scratch, "-c", FIND_AND_CHECK)
    assert found.returncode == 0, found.stderr
    methods, in_reference, refusal = found.stdout.strip().splitlines()
    assert methods == "{'clip': 'clip/demo', 'clip_l2': 'clip_l2/demo'}"  # make compare's METHODS
    assert in_reference == "True"  # make docs lists its settings
    assert "Did you mean model.objectives.clip_l2.l2_weight or" in refusal
