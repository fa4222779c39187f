import http.server
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_raw_shard
from PIL import Image

import demo.download
import demo.server
from datapipe.common import shard_io
from datapipe.fetch import download

REPO = Path(__file__).parents[1]


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
        download.download_dataset("demo", tmp_path / "raw", tmp_path / "x.tsv", distributor="ray")


def test_demo_download_summary_counts_every_url(demo_shards):
    totals, failures = download.summarize(demo_shards["raw"])
    expected_failures = sum(item.expected == "download_failed" for item in demo_shards["items"])
    assert totals["count"] == len(demo_shards["items"])
    assert totals["count"] - totals["successes"] == sum(failures.values()) == expected_failures


def test_demo_raw_images_are_passed_through_unchanged(demo_shards):
    """skip_reencode: a small JPEG is stored as served, so `make shards` judges the original."""
    from datapipe.common import shard_io

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
    totals, failures = demo.download.download_demo(
        tmp_path / "raw", demo_root=tmp_path / "source", demo_size=20, processes=1, threads=4, distributor="pyspark")
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
    with pytest.raises(SystemExit, match=r"disk holding .*raw is full: 2 images could not be saved.*MiB"):
        download.check_finished(raw, rows=6, samples_per_shard=3)
    assert sorted(path.name for path in raw.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_a_shard_img2dataset_did_not_finish_fails_the_download(tmp_path):
    """img2dataset only prints a failed worker's traceback and returns: the shard without its stats must fail."""
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(), "saved")] * 3)
    write_raw_shard(raw, 1, [(jpeg_bytes(), "saved")] * 3)
    (raw / "00001_stats.json").unlink()
    with pytest.raises(SystemExit, match=r"img2dataset did not finish 1 of 2 shard\(s\) \(00001; its messages"):
        download.check_finished(raw, rows=6, samples_per_shard=3)
    assert sorted(path.name for path in raw.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


@pytest.mark.parametrize("option, value, message", [
    ("thread_count", 0, r"--thread_count 0 cannot work \(make's THREADS, or --thread_count\): .*at least 1"),
    ("processes_count", 0, r"--processes_count 0 cannot work \(make's PROCESSES"),
    ("number_sample_per_shard", 0, "--number_sample_per_shard 0 cannot work"),
    ("image_size", -5, "--image_size -5 cannot work: img2dataset needs at least 1"),
    ("timeout", 0, "--timeout 0 cannot work: img2dataset needs more than 0"),
    ("encode_quality", 101, "--encode_quality 101 does not suit --encode_format jpg"),
])
def test_values_img2dataset_cannot_work_with_are_refused_before_fetching(tmp_path, option, value, message):
    url_list_path = write_list(tmp_path / "a.tsv", range(3))
    with pytest.raises(SystemExit, match=message):
        download.main(["--dataset", "cc3m", "--url-list", str(url_list_path), "--out", str(tmp_path / "out" / "raw"),
                       f"--{option}", str(value)])
    assert not (tmp_path / "out").exists()


def test_a_url_list_download_onto_a_full_disk(tmp_path, small_file_system, capfd):
    www = tmp_path / "www"
    www.mkdir()
    for number in range(24):  # about 90 KB each: the 1 MiB disk holds about a dozen
        noise = np.random.default_rng(number).integers(0, 256, (200, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(www / f"{number}.jpg", quality=95)
    raw = small_file_system / "raw"
    with demo.server.serve(www) as base_url:
        url_list_path = tmp_path / "list.tsv"
        url_list_path.write_text("".join(f"noise {number}\t{base_url}/{number}.jpg\n" for number in range(24)))
        with pytest.raises(SystemExit, match=r"disk holding .*raw is full.* removed; they need about [0-9.]+ MiB") \
                as stop:
            download.download_dataset("cc3m", raw, url_list_path, processes=1, threads=4,
                                      img2dataset_options={"number_sample_per_shard": 6})
    shown = capfd.readouterr()
    log = small_file_system / download.DISK_FULL_LOG  # the workers' tracebacks, there and not in the terminal
    assert "Traceback" not in shown.out + shown.err and "No space left" not in shown.out + shown.err, shown
    assert "Starting the downloading" in shown.out  # img2dataset's other output is shown as before
    assert f"messages about it are in {log}." in str(stop.value) and "\n" not in str(stop.value)
    assert "Traceback (most recent call last)" in log.read_text() and "[Errno 28]" in log.read_text()
    tars = sorted(raw.glob("*.tar"))
    assert 0 < len(tars) < 4
    for tar in tars:  # what is left is whole: stats, a readable parquet, every sample
        assert tar.with_name(f"{tar.stem}_stats.json").exists()
        assert pq.read_table(tar.with_suffix(".parquet")).num_rows == 6
        assert len(list(shard_io.read_samples([tar]))) == 6
    assert sorted(raw.glob("*.parquet")) == [tar.with_suffix(".parquet") for tar in tars]


WORKER = r"""
import errno, os, sys, traceback
def fail(error):
    try:
        raise error
    except OSError as err:
        traceback.print_exc()
        print(f"Sample 3 failed to download: {err}", flush=True)
sys.stderr.write("\r0it [00:00, ?it/s]")  # tqdm's bar, unfinished when a worker's traceback starts
sys.stderr.flush()
fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
try:
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("writer closed")
except RuntimeError:
    traceback.print_exc()
fail(PermissionError(errno.EACCES, "Permission denied"))
print("shard 1 failed with error [Errno 28] No space left on device")
print("worker  - success: 1.000 - count: 6")
sys.stderr.write("\r1it [00:01, 1.00it/s]")
"""


def test_full_disk_tracebacks_go_to_the_log_and_the_rest_to_the_terminal(tmp_path, capfd):
    """img2dataset's workers inherit the filtered stdout and stderr (no root needed, unlike the tmpfs test)."""
    messages = download.DiskFullMessages(tmp_path / download.DISK_FULL_LOG)
    with messages.kept():
        subprocess.run([sys.executable, "-c", WORKER], check=True)
        print("after the workers")
    shown = capfd.readouterr()
    assert shown.err.startswith("\r0it [00:00, ?it/s]Traceback (most recent call last):\n")  # the other error
    assert shown.err.count("Traceback") == 1 and "PermissionError: [Errno 13] Permission denied" in shown.err
    assert shown.err.endswith("\r1it [00:01, 1.00it/s]") and "No space left" not in shown.err
    assert shown.out == ("Sample 3 failed to download: [Errno 13] Permission denied\n"
                         "worker  - success: 1.000 - count: 6\nafter the workers\n")
    assert len(messages) == 4 and messages.save() is None
    kept = (tmp_path / download.DISK_FULL_LOG).read_text()
    assert kept.count("Traceback") == 3 and "During handling of the above exception" in kept
    assert "RuntimeError: writer closed" in kept and "shard 1 failed with error [Errno 28]" in kept


def test_16_bit_png_and_tiff_keep_their_tones_through_make_download(tmp_path):
    """img2dataset's JPEG encoder clips 16-bit pixels at 255 (a mid-grey gradient came out near-white)."""
    import cv2

    www = tmp_path / "www"
    www.mkdir()
    ramp = np.linspace(0, 65535, 160).round().astype(np.uint16)  # mean 127.5 once scaled to 8 bits
    grey = np.tile(ramp, (120, 1))  # (H, W)
    images = {"rgb16.png": np.dstack([grey] * 3), "grey16.png": grey, "rgb16.tif": np.dstack([grey] * 3),
              "grey16-large.tif": np.tile(np.linspace(0, 65535, 600).round().astype(np.uint16), (450, 1))}
    for name, pixels in images.items():  # the large one is downscaled to 384 px by img2dataset
        assert cv2.imwrite(str(www / name), pixels)
    with demo.server.serve(www) as base_url:
        url_list_path = tmp_path / "list.tsv"
        url_list_path.write_text("".join(f"{name}\t{base_url}/{name}\n" for name in images))
        done = subprocess.run(["make", "--no-print-directory", "download", "DATASET=cc3m", f"URL_LIST={url_list_path}",
                               f"OUT={tmp_path / 'out'}", "PROCESSES=1", "THREADS=4"], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    means = {}
    for sample in shard_io.read_samples(sorted((tmp_path / "out" / "raw").glob("*.tar"))):
        means[sample["txt"].decode()] = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L")).mean()
    assert means.keys() == images.keys()
    assert all(abs(mean - 127.5) < 2 for mean in means.values()), means


class DrippingHandler(http.server.BaseHTTPRequestHandler):
    """An image server that sends a byte every 0.25 s: img2dataset's per-read timeout never fires."""

    def do_GET(self):  # the name http.server calls
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"\0")
                time.sleep(0.25)
        except OSError:  # the client gave up
            pass

    def log_message(self, format, *args):
        pass


def test_a_dripping_server_is_given_an_overall_deadline_per_image(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DrippingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url_list_path = tmp_path / "list.tsv"
        url_list_path.write_text("".join(f"slow {number}\thttp://127.0.0.1:{server.server_address[1]}/{number}.jpg\n"
                                         for number in range(2)))
        totals, failures = download.download_dataset("cc3m", tmp_path / "raw", url_list_path, processes=1, threads=2,
                                                     img2dataset_options={"timeout": 1, "retries": 0})
    finally:
        server.shutdown()
        server.server_close()
    errors = pq.read_table(tmp_path / "raw" / "00000.parquet")["error_message"].to_pylist()
    assert totals["successes"] == 0 and errors == ["the image took more than 3 s in all (3 x --timeout)"] * 2


def test_a_full_disk_while_the_url_list_is_normalized(tmp_path, small_file_system):
    url_list_path = tmp_path / "list.tsv"  # about 4 MiB of captions that do not compress
    captions = np.random.default_rng(0).integers(0, 2**63, (40_000, 3))
    url_list_path.write_text("".join(f"{' '.join(map(str, caption))}\thttp://127.0.0.1:9/{number}.jpg\n"
                                     for number, caption in enumerate(captions)))
    with pytest.raises(SystemExit, match=r"disk holding .*small_disk is full: the normalized url list .*MiB"):
        download.download_dataset("cc3m", small_file_system / "raw", url_list_path)
    assert not list(small_file_system.glob("urls*"))  # nothing half-written is left
