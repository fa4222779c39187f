"""img2dataset's own options through `make download`, and the documented data-path examples (README and docs/) run
as written."""

import csv
import io
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from doc_commands import doc_lines
from PIL import Image

import demo.dataset
import demo.download
import demo.server
from datapipe.common import shard_io
from datapipe.fetch import download_options

REPO = Path(__file__).parents[1]


def test_options_take_img2dataset_names_and_types():
    options = download_options.parse(["--image_size", "256", "--resize-mode=keep_ratio", "--resize_only_if_bigger",
                                      "--timeout", "20", "--user_agent_token", "img2dataset",
                                      "--disallowed_header_directives", "[]", "--max_aspect_ratio", "3.5",
                                      "--skip_reencode", "false", "--save_additional_columns", "a,b"])
    assert options == dict(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, timeout=20,
                           user_agent_token="img2dataset", disallowed_header_directives=[], max_aspect_ratio=3.5,
                           skip_reencode=False, save_additional_columns=["a", "b"])


@pytest.mark.parametrize("tokens, message", [
    (["--imagesize", "256"], "no option --imagesize; did you mean --image_size"),
    (["--image_size", "big"], "--image_size takes a number"),
    (["--resize_mode", "stretch"], "not one of img2dataset's choices: no, keep_ratio"),
    (["--skip_reencode", "maybe"], "takes true or false"),
    (["--output_folder", "x"], "set by make download: the output folder is OUT"),
    (["--output_format", "parquet"], "always webdataset"),
    (["--timeout"], "--timeout needs a value"),
    (["256"], "unexpected argument '256'"),
])
def test_bad_options_are_refused_with_the_fix(tokens, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        download_options.parse(tokens)


def test_user_options_override_the_preset(tmp_path):
    """The demo preset stores images up to 256 px; --image_size 48 makes img2dataset downscale to 48."""
    demo.download.main(["--out", str(tmp_path / "raw"), "--demo-size", "10", "--processes", "1",
                   "--threads", "4", "--image_size", "48", "--skip_reencode", "false"])
    sides = [min(Image.open(io.BytesIO(sample["jpg"])).size)
             for sample in shard_io.read_samples(sorted((tmp_path / "raw").glob("*.tar")))]
    assert sides and max(sides) <= 48


def test_png_downloads_get_a_png_compression_level_not_the_presets_jpeg_quality(tmp_path):
    demo.download.main(["--dataset", "demo", "--out", str(tmp_path / "raw"), "--demo-size", "10", "--processes", "1",
                        "--threads", "4", "--encode_format", "png", "--skip_reencode", "false"])
    samples = list(shard_io.read_samples(sorted((tmp_path / "raw").glob("*.tar"))))
    assert samples and all(Image.open(io.BytesIO(sample["png"])).format == "PNG" for sample in samples)


@pytest.mark.parametrize("given, message", [
    ({"encode_format": "png", "encode_quality": 95}, "--encode_quality 95 does not suit --encode_format png: for png "
                                                     "it is the PNG compression level, 0 to 9"),
    ({"encode_quality": 101}, "--encode_quality 101 does not suit --encode_format jpg: for jpg it is the JPEG "
                              "quality, 0 to 100"),
])
def test_an_encode_quality_the_format_cannot_take_is_refused(given, message):
    with pytest.raises(SystemExit, match=message):
        download_options.fit_encode_quality({"encode_format": "jpg", "encode_quality": 95, **given}, given)


# --- the documented `make download` / `make shards` lines (README and docs/), run as written -------

def documented_make_commands():
    return [shlex.split(line.strip(), comments=True) for line in doc_lines()
            if line.strip().startswith(("make download", "make shards"))]


def write_url_list(path, dataset, arguments, rows):
    """`rows` (caption, url) in the format the documented command expects for `dataset`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if dataset == "custom":
        names = dict(zip(("url", "caption"), ("url", "caption"), strict=True))
        download_args = shlex.split(arguments.get("DOWNLOAD_ARGS", ""))
        for flag, column in (("--url-col", "url"), ("--caption-col", "caption")):
            if flag in download_args:
                names[column] = download_args[download_args.index(flag) + 1]
        with open(path, "w", newline="") as out:
            writer = csv.writer(out, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow([names["caption"], names["url"]])
            writer.writerows(rows)
    else:
        columns = {"cc3m": lambda c, u: f"{c}\t{u}", "cc12m": lambda c, u: f"{u}\t{c}"}[dataset]
        path.write_text("".join(columns(caption, url) + "\n" for caption, url in rows))


def test_documented_data_examples_run_as_written(tmp_path):
    """Every line of the README and docs/ starting with `make download` or `make shards`, with its url list and
    folders under a folder whose name has a space; the url list holds a small demo set served on 127.0.0.1."""
    commands = documented_make_commands()
    assert len(commands) >= 4, commands
    base = tmp_path / "with space"
    items = demo.dataset.ensure_generated(tmp_path / "source", num_train=12, heldout_per_class=1, probe_per_class=1,
                                       heldout_pairs=2)
    with demo.server.serve(tmp_path / "source" / "www") as base_url:
        rows = [(item.caption, f"{base_url}/{item.path}") for item in items]
        for command in commands:
            targets = [word for word in command[1:] if "=" not in word]
            arguments = dict(word.split("=", 1) for word in command[1:] if "=" in word)
            if "://" in arguments.get("SPARK_MASTER", ""):
                continue  # a cluster no test reaches; the same command without it runs on local[*]
            dataset = arguments.get("DATASET", "demo")
            if "URL_LIST" in arguments:
                arguments["URL_LIST"] = str(base / "lists" / Path(arguments["URL_LIST"]).name)
                write_url_list(Path(arguments["URL_LIST"]), dataset, arguments, rows)
            arguments["OUT"] = str(base / arguments.get("OUT", f"shards/{dataset}"))
            if "EXCLUDE" in arguments:  # evaluation folders, each with a copy of a training image built above
                folders = [base / "eval" / Path(path).name for path in arguments["EXCLUDE"].split(":")]
                built = sorted((base / f"shards/{dataset}/train").glob("*.tar"))
                for folder, sample in zip(folders, shard_io.read_samples(built), strict=False):
                    folder.mkdir(parents=True, exist_ok=True)
                    image = Image.open(io.BytesIO(sample["jpg"]))
                    image.resize((image.width // 2, image.height // 2)).save(folder / "copy.png")
                arguments["EXCLUDE"] = ":".join(map(str, folders))
            if "RAW" in arguments:  # an img2dataset download the user already has: the cc3m one above
                arguments["RAW"] = str(base / "shards" / "cc3m" / "raw")
                arguments["OUT"] += "-from-raw"
            done = subprocess.run(["make", "--no-print-directory", *targets,
                                   *[f"{name}={value}" for name, value in arguments.items()]],
                                  cwd=REPO, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "CI": os.environ.get("CI", "")})
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
            if "shards" in targets:
                result = json.loads((Path(arguments["OUT"]) / "train" / "manifest.json").read_text())
                if "EXCLUDE" in arguments:
                    assert [entry["overlapping_samples"] for entry in result["exclude"]] == [1] * len(folders)


def test_make_refuses_the_old_args_variable():
    done = subprocess.run(["make", "-n", "shards", "ARGS=--compress"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "DOWNLOAD_ARGS" in done.stderr and "SHARDS_ARGS" in done.stderr


def test_make_download_without_a_url_list_serves_the_demo_set(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "download", f"OUT={tmp_path}", "PROCESSES=1", "THREADS=4",
                           "DOWNLOAD_ARGS=--demo-size 10"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo: serving 25 entries" in done.stdout and (tmp_path / "raw" / "00000_stats.json").exists()
