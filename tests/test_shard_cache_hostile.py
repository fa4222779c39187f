"""The shard cache under a hostile run (issue 31): a damaged cache file, an object replaced mid-run, a full cache
disk, a cache_dir that is a file, gs:// without a network. Against the real S3 server on 127.0.0.1 and a real tmpfs."""

import http.server
import json
import logging
import os
import socket
import threading
import time

import pytest
import test_remote_shards
from conftest import tmpfs

from datapipe import make_loader
from datapipe.common import shard_io
from datapipe.common.object_store import RemoteFolder, StorageError
from datapipe.load import shard_cache
from datapipe.load.loader import CacheOptions
from datapipe.load.samples import ShardSet
from datapipe.load.shard_cache import ShardRefused

pytestmark = pytest.mark.network
SETTINGS = test_remote_shards.SETTINGS
local_shards, server = test_remote_shards.local_shards, test_remote_shards.server  # the module's fixtures


def copy_to_bucket(server, local_shards, location):
    server.upload_folder(local_shards, location)
    return location


def open_remote(location, cache_dir):
    return ShardSet.from_path(location, cache_dir, 10**9, 1, 0.01)


def flip_one_byte(path, offset=700):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as bit rot: same size, same time


def test_a_damaged_cached_shard_is_fetched_again_once_per_process_then_refused(local_shards, server, tmp_path,
                                                                               caplog, monkeypatch):
    location = copy_to_bucket(server, local_shards, "s3://datasets/damaged/train")
    tar_path, _ = open_remote(location, tmp_path / "cache").cache.paths(1)
    flip_one_byte(tar_path)
    hashed = []
    monkeypatch.setattr(shard_cache, "sha256_file", lambda path: hashed.append(path) or shard_io.sha256_file(path),
                        raising=False)
    reader = open_remote(location, tmp_path / "cache")  # a new process's cache: it trusts nothing it did not check
    with caplog.at_level(logging.WARNING, logger="datapipe"):
        assert reader.cache.paths(1)[0].read_bytes() == (local_shards / "000001.tar").read_bytes()
    assert "000001.tar" in caplog.text and "fetching it again" in caplog.text
    hashed.clear()
    for _ in range(3):
        reader.cache.paths(1)
    assert hashed == []  # checked once per process, not per read
    # Damaged again, and the object now differs from its manifest too: refused by name, nothing of it kept.
    flip_one_byte(tar_path)
    server.filesystem().pipe_file("datasets/damaged/train/000001.tar", tar_path.read_bytes())
    with pytest.raises(ShardRefused, match=r"damaged/train/000001.tar: its sha256 differs.*fetched twice"):
        open_remote(location, tmp_path / "cache").cache.paths(1)
    assert not list((tmp_path / "cache").glob("*000001*.tar*"))


def test_an_object_replaced_mid_run_is_fetched_again_then_refused_in_one_line(local_shards, server, tmp_path):
    location = copy_to_bucket(server, local_shards, "s3://datasets/replaced/train")
    reader = open_remote(location, tmp_path / "cache")  # lists the objects (their ETags)
    other = (local_shards / "000002.tar").read_bytes()
    server.filesystem().pipe_file("datasets/replaced/train/000001.tar", other)  # replaced after the listing
    with pytest.raises(ShardRefused) as refused:
        reader.cache.paths(1)
    message = str(refused.value)
    assert "\n" not in message and "replaced/train/000001.tar" in message and "FileExpired" not in message
    assert "fetched twice" in message
    assert not list((tmp_path / "cache").glob("*000001.tar*"))
    server.filesystem().pipe_file("datasets/replaced/train/000001.tar", (local_shards / "000001.tar").read_bytes())
    assert reader.cache.paths(1)[0].read_bytes() == (local_shards / "000001.tar").read_bytes()  # put back: read


@pytest.fixture
def tiny_disk(tmp_path):
    """A 128 KiB tmpfs: a real file system that fills up."""
    with tmpfs(tmp_path / "tiny_disk", "size=128k") as mount_point:
        yield mount_point


def test_a_full_cache_disk_names_the_cache_folder_the_bytes_and_the_fix(local_shards, server, tiny_disk):
    location = copy_to_bucket(server, local_shards, "s3://datasets/full/train")
    reader = open_remote(location, tiny_disk / "cache")
    shard_bytes = reader.cache.shards[0].total_bytes
    (tiny_disk / "filler").write_bytes(b"x" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
                                              - shard_bytes // 2))
    with pytest.raises(StorageError) as full:
        reader.cache.paths(0)
    message = str(full.value)
    assert "\n" not in message, message
    assert f"data.cache_dir={tiny_disk / 'cache'}" in message and f"needs {shard_bytes} bytes" in message, message
    assert "bytes are free" in message and "data.cache_limit_gb" in message, message
    assert not list((tiny_disk / "cache").glob("*.partial")) and not list((tiny_disk / "cache").glob("*.tar"))


def test_a_cache_dir_that_is_a_file_is_one_line_from_the_loader_and_the_config_check(server, tmp_path):
    from train.config import parse_command_line

    (tmp_path / "notes.txt").write_text("the user's file")
    with pytest.raises(StorageError, match=r"^data.cache_dir=.*notes.txt is a file, not a folder; point "
                                           r"data.cache_dir at a folder"):
        make_loader("s3://datasets/demo/train", backend="dali",
                    cache=CacheOptions(folder=tmp_path / "notes.txt", limit_gb=1.0), **SETTINGS)
    with pytest.raises(SystemExit, match=r"^config error: data.cache_dir=.*notes.txt is a file, not a folder"):
        parse_command_line(["--config", "harmony/demo", "data.shards=s3://datasets/demo/train",
                            f"data.cache_dir={tmp_path / 'notes.txt'}"], "")
    assert (tmp_path / "notes.txt").read_text() == "the user's file"


def resolves(host):
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def test_gs_without_a_network_stops_fast_in_one_line(tmp_path, capfd):
    """gcsfs would look for credentials for 15 s, then try each request 6 times, logging tracebacks."""
    from train.config import parse_command_line

    if resolves("storage.googleapis.com"):
        pytest.skip("this machine reaches the network: the test needs one without")
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        parse_command_line(["--config", "harmony/demo", "data.shards=gs://harmony-no-network/train",
                            f"data.cache_dir={tmp_path / 'cache'}"], "")
    assert time.monotonic() - started < 30
    message = str(stopped.value)
    assert message.startswith("config error: gs://harmony-no-network/train: cannot resolve storage.googleapis.com")
    assert "\n" not in message and "no network" in message
    assert "Traceback" not in capfd.readouterr().err


class RefusingGcs(http.server.BaseHTTPRequestHandler):
    """A GCS endpoint that refuses every request's credentials, as storage.googleapis.com a revoked key's."""

    paths = []

    def do_GET(self):
        self.paths.append(self.path)
        body = json.dumps({"error": {"code": 401, "message": "Invalid Credentials"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_refused_gs_credentials_are_not_retried(monkeypatch, capfd):
    refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingGcs)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{refusing.server_port}")
    try:
        with pytest.raises(StorageError, match=r"^reading gs://bucket/train/manifest.json: the credentials were "
                                               r"refused or are missing \(.*\); set GOOGLE_APPLICATION_CREDENTIALS"):
            RemoteFolder("gs://bucket/train", retries=2, first_wait_s=0.01).read_bytes("manifest.json")
    finally:
        refusing.shutdown()
    assert len(RefusingGcs.paths) == 1  # gcsfs alone tries 6 times over about 30 s
    assert "Traceback" not in capfd.readouterr().err


def test_an_endpoint_whose_name_does_not_resolve_is_not_retried(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://no-such-host.invalid:9000")
    with caplog.at_level(logging.WARNING, logger="datapipe"), \
            pytest.raises(StorageError, match=r"^reading s3://bucket/train/manifest.json: the server's name does not "
                                              r"resolve \(.*\); check the network"):
        RemoteFolder("s3://bucket/train", retries=2, first_wait_s=0.01).read_bytes("manifest.json")
    assert "try 2 of" not in caplog.text
