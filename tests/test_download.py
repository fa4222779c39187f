import json

import pytest

from datapipe import download


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file, whoever runs the test
    with pytest.raises(SystemExit, match="cannot write to output folder .*a-file/raw"):
        download.download_dataset("cc3m", blocker / "raw", url_list_path=tmp_path / "x.tsv")


def test_missing_url_list_names_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="needs a url list.*ConceptualCaptions"):
        download.download_dataset("cc3m", tmp_path / "raw")


def test_unknown_dataset_and_distributor(tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset 'imagenet'"):
        download.download_dataset("imagenet", tmp_path / "raw")
    with pytest.raises(SystemExit, match="unknown distributor"):
        download.download_dataset("demo", tmp_path / "raw", distributor="ray")


def test_demo_download_summary_counts_every_url(demo_shards):
    totals, failures = download.summarize(demo_shards["raw"])
    expected_failures = sum(item.expected == "download_failed" for item in demo_shards["items"])
    assert totals["count"] == len(demo_shards["items"])
    assert totals["count"] - totals["successes"] == sum(failures.values()) == expected_failures


def test_demo_raw_images_are_passed_through_unchanged(demo_shards):
    """skip_reencode: a small JPEG is stored as served, so `make shards` judges the original."""
    from datapipe import shard_io

    www = demo_shards["root"] / "source" / "www"
    for sample in shard_io.read_samples(sorted(demo_shards["raw"].glob("*.tar"))):
        url = json.loads(sample["json"])["url"]
        if url.endswith("gray.jpg"):
            assert sample["jpg"] == (www / "gray.jpg").read_bytes()
            return
    pytest.fail("the grayscale JPEG was not downloaded")


@pytest.mark.slow
def test_pyspark_distributor_in_local_mode(tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # keep Spark on loopback
    totals, failures = download.download_dataset(
        "demo", tmp_path / "raw", processes=1, threads=4, distributor="pyspark",
        demo_root=tmp_path / "source", demo_size=20)
    assert totals["count"] == 20 + 15 and totals["successes"] == totals["count"] - sum(failures.values())
