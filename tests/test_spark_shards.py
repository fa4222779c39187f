"""`make shards DISTRIBUTOR=pyspark`: on Spark's local mode the build gives what the local build gives (samples,
bytes, order, reasons, manifest), a killed build run again gives it too, and a missing Java or pyspark is one line.
One Spark session (local[2]) serves the module; the raw set is tiny but holds every kind of drop."""

import os
import shutil
import sys

import numpy as np
import pytest
from conftest import jpeg_bytes, write_raw_shard

from datapipe import shards
from datapipe.common import manifest, shard_io
from datapipe.shards import spark_session
from tools.bench.near_duplicates import jpeg, original


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    try:
        spark_session.check_requirements()
    except shards.BuildError as error:
        pytest.skip(str(error))
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # keep Spark on loopback
        patch.setenv("PYSPARK_PYTHON", sys.executable)
        session = (SparkSession.builder.master("local[2]").appName("test_spark_shards")
                   .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
        yield session
        session.stop()


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    """Two raw shards: an exact duplicate, a near duplicate, two samples that look like the evaluation image (one a
    re-encoded copy of the other), an undecodable image, a tiny one, an empty caption and failed downloads."""
    root = tmp_path_factory.mktemp("spark_raw")
    rng = np.random.default_rng(5)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(8)]
    pictures = [(jpeg(image, 90), f"picture {number}") for number, image in enumerate(images)]
    write_raw_shard(root / "raw", 0, pictures[:4] + [(jpeg_bytes()[:200], "broken"), (jpeg_bytes(30, 30), "tiny")],
                    failures=["HTTP Error 404"])
    half = images[2].resize((images[2].width // 2, images[2].height // 2))
    write_raw_shard(root / "raw", 1, pictures[4:] + [
        (pictures[1][0], "same pixels as picture 1"), (jpeg(half, 70), "picture 2, smaller"),
        (jpeg(images[6], 60), "picture 6 again"), (jpeg_bytes(97, 80), "  \n")], failures=["timeout"])
    (root / "eval").mkdir()
    (root / "eval" / "copy.jpg").write_bytes(jpeg(images[6].resize((images[6].width * 3 // 4,
                                                                    images[6].height * 3 // 4)), 60))
    return root


def build(raw_set, out_dir, distributor, raw=None):
    return shards.build(raw or raw_set / "raw", out_dir, samples_per_shard=3, processes=1, distributor=distributor,
                        duplicates=shards.DuplicateRules(exclude=(str(raw_set / "eval"),)))


def contents(train_dir):
    """What a build leaves for its readers: every shard and index file's bytes, the rejection log, the manifest."""
    files = {path.name: path.read_bytes() for path in sorted(train_dir.iterdir()) if path.suffix in (".tar", ".idx")}
    return files, manifest.read_rejected(train_dir / manifest.REJECTED), (train_dir / manifest.MANIFEST).read_text()


@pytest.fixture(scope="module")
def local_build(raw_set):
    build(raw_set, raw_set / "local" / "set" / "train", "multiprocessing")
    return contents(raw_set / "local" / "set" / "train")


@pytest.fixture(scope="module")
def spark_build(spark, raw_set):
    train = raw_set / "spark" / "set" / "train"
    return train, build(raw_set, train, "pyspark")


def test_spark_gives_the_local_build_s_samples_bytes_order_and_reasons(spark_build, local_build):
    train, result = spark_build
    assert contents(train) == local_build
    assert result["reconciliation"]["rejected"] == {"duplicate": 1, "empty_caption": 1, "eval_overlap": 2,
                                                    "near_duplicate": 1, "too_small": 1, "undecodable": 1}
    samples = list(shard_io.read_samples(sorted(train.glob("*.tar"))))
    assert [sample["txt"].decode() for sample in samples] == [f"picture {number}" for number in (0, 1, 2, 3, 4, 5, 7)]
    assert shards.verify(train) == []


def test_a_killed_spark_build_run_again_gives_the_same_shards(spark_build, raw_set, local_build):
    """What a build killed at any point leaves: no manifest, half-written files, a shard without its done record,
    the records of a raw shard gone (a copy of the Spark build above, so that one build runs here)."""
    train = raw_set / "killed" / "set" / "train"
    shutil.copytree(spark_build[0], train)
    (train / manifest.MANIFEST).unlink()
    (train / "000001.tar").rename(train / "000001.tar.partial")
    (train / shards.WORK_DIR / "000002.done.json").write_text('{"made_from": ')
    (train / shards.WORK_DIR / "00001.jsonl").unlink()
    build(raw_set, train, "pyspark")
    assert contents(train) == local_build
    assert not list(train.glob("*.partial")) and shards.verify(train) == []


def test_a_changed_raw_shard_is_rebuilt_on_spark_as_the_local_build_builds_it(spark_build, raw_set):
    """A raw shard replaced by another download (one sample fewer): the Spark build of the earlier input, run again,
    rewrites the training shards the change reaches, keeps the first (its samples are unchanged), and gives what a
    fresh local build of the new input gives."""
    raw = raw_set / "changed" / "raw"
    shutil.copytree(raw_set / "raw", raw)
    samples = [(sample["jpg"], sample["txt"].decode()) for sample in shard_io.read_samples([raw / "00001.tar"])]
    write_raw_shard(raw, 1, samples[1:], failures=["timeout"])
    train, local = raw_set / "changed" / "spark" / "set" / "train", raw_set / "changed" / "local" / "set" / "train"
    shutil.copytree(spark_build[0], train)
    first_shard = (train / shards.WORK_DIR / "000000.done.json").stat().st_mtime_ns
    build(raw_set, train, "pyspark", raw=raw)
    build(raw_set, local, "multiprocessing", raw=raw)
    assert contents(train) == contents(local)
    assert (train / shards.WORK_DIR / "000000.done.json").stat().st_mtime_ns == first_shard
    assert "picture 4" not in [sample["txt"].decode() for sample in shard_io.read_samples(sorted(train.glob("*.tar")))]


def test_missing_java_or_pyspark_is_one_line_naming_the_install(raw_set, tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # a JAVA_HOME without bin/java
    with pytest.raises(SystemExit) as stopped:
        shards.main(["build", str(raw_set / "raw"), str(tmp_path / "train"), "--distributor", "pyspark"])
    message = str(stopped.value.code)
    assert "needs Java" in message and "install Java 17" in message and "\n" not in message
    monkeypatch.setitem(sys.modules, "pyspark", None)  # as if it were not installed
    with pytest.raises(shards.BuildError) as stopped:
        spark_session.check_requirements()
    assert "pip install pyspark" in str(stopped.value.code) and "\n" not in str(stopped.value.code)
    assert not os.path.exists(tmp_path / "train")
