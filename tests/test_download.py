import json

import pytest
from conftest import jpeg_bytes, write_raw_shard

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


def write_list(path, rows):
    path.write_text("".join(f"caption {i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in rows))
    return path


def test_a_new_url_list_into_an_existing_download_is_refused(tmp_path):
    """img2dataset's incremental mode would keep the old shards: the download must say so, not pass."""
    raw = tmp_path / "out" / "raw"
    raw.mkdir(parents=True)
    source = download.get_source("cc3m")
    columns = dict(url_column="url", caption_column="caption")
    first = download.prepare_url_list(write_list(tmp_path / "a.tsv", range(5)), raw, source, columns, ("http",))
    (raw / "00000_stats.json").write_text("{}")  # a shard of it was downloaded
    again = download.prepare_url_list(write_list(tmp_path / "a.tsv", range(5)), raw, source, columns, ("http",))
    assert again.fingerprint == first.fingerprint  # the same list again: resume
    before = (tmp_path / "out" / "urls.parquet").read_bytes()
    with pytest.raises(SystemExit, match=r"holds another url list \(.*a.tsv, 5 rows\); .*b.tsv \(6 rows\) differs"):
        download.prepare_url_list(write_list(tmp_path / "b.tsv", range(6)), raw, source, columns, ("http",))
    assert (tmp_path / "out" / "urls.parquet").read_bytes() == before  # the record still says what raw/ holds


def test_a_full_disk_during_download_stops_and_removes_what_it_spoiled(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(), "saved")] * 3)
    write_raw_shard(raw, 1, [(jpeg_bytes(), "saved")], failures=["[Errno 28] No space left on device"] * 2)
    with pytest.raises(SystemExit, match=r"disk holding .*raw is full: 2 images could not be saved.*GiB"):
        download.check_disk_full(raw)
    assert sorted(path.name for path in raw.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
