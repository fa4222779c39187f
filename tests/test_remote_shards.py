"""Shards in object storage, read through the bounded local cache, against a real S3 server on 127.0.0.1."""

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import write_training_shards
from PIL import Image
from test_train import TINY_MODEL, losses_logged, tiny_config

from datapipe import SingleCrop, make_loader
from datapipe.common import shard_io
from datapipe.common.object_store import StorageError
from datapipe.load.loader import CacheOptions
from datapipe.load.samples import ShardSet, epoch_order
from datapipe.load.shard_cache import MARKER, ShardCache, ShardRefused
from datapipe.load.shard_schedule import ShardSchedule
from tools.s3_loopback import S3Server
from train import checkpoint

pytestmark = pytest.mark.network
RECIPE = SingleCrop(size_px=32, flip_prob=0.5)
SETTINGS = dict(recipe=RECIPE, batch_size=4, seed=5, shuffle_window=8, num_workers=2)


def with_manifest_hashes(train_dir):
    """Add what `make shards` records per shard (bytes, sha256, index) to write_training_shards' manifest."""
    manifest = json.loads((train_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        tar_path = train_dir / entry["name"]
        entry.update(bytes=tar_path.stat().st_size, sha256=shard_io.sha256_file(tar_path),
                     index=tar_path.with_suffix(".idx").name,
                     index_sha256=shard_io.sha256_file(tar_path.with_suffix(".idx")))
    (train_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    images = np.random.default_rng(0).integers(0, 256, (44, 40, 48, 3), dtype=np.uint8)
    train_dir = write_training_shards(tmp_path_factory.mktemp("remote") / "train", images, samples_per_shard=8)
    with_manifest_hashes(train_dir)
    return train_dir


@pytest.fixture(scope="module")
def server(local_shards):
    server = S3Server().start()
    server.upload_folder(local_shards, "s3://datasets/demo/train")
    yield server
    server.stop()


def cache_options(tmp_path, limit_gb=1.0):
    return CacheOptions(folder=tmp_path / "cache", limit_gb=limit_gb, fetch_retries=2, retry_wait_s=0.05)


def batches(loader, count=None):
    got = []
    for batch in loader:
        got.append(batch)
        if count is not None and len(got) == count:
            break
    return got


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.keys == theirs.keys
        torch.testing.assert_close(mine.global_crops, theirs.global_crops, rtol=0, atol=0)
        torch.testing.assert_close(mine.tokens, theirs.tokens, rtol=0, atol=0)


def cached_bytes(folder):
    """Bytes of the cache's files now; a .partial renamed to its shard (or an evicted file) between the listing and
    its stat is not counted twice or at all: the loader's fetch threads keep working while the test looks. The
    listing is taken whole before any stat: a rename while it is read may list both names, and only one exists."""
    total = 0
    for path in list(folder.iterdir()):
        if path.suffix in (".tar", ".idx", ".partial"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
    return total


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_remote_shards_give_the_local_batches(local_shards, server, tmp_path, backend):
    """Two epochs from the bucket equal two epochs from the local folder, crops and all; the source is untouched."""
    before = {entry["name"]: entry["ETag"] for entry in server.filesystem().ls("datasets/demo/train", detail=True)}
    local = make_loader(local_shards, backend=backend, **SETTINGS)
    remote = make_loader("s3://datasets/demo/train", backend=backend, cache=cache_options(tmp_path), **SETTINGS)
    assert remote.shards.fingerprint == local.shards.fingerprint
    for _ in range(2):
        assert_same_batches(batches(remote), batches(local))
    after = {entry["name"]: entry["ETag"] for entry in server.filesystem().ls("datasets/demo/train", detail=True)}
    assert after == before


def test_a_cache_smaller_than_the_dataset_stays_under_its_limit(local_shards, server, tmp_path):
    shard_bytes = [path.stat().st_size + path.with_suffix(".idx").stat().st_size
                   for path in sorted(local_shards.glob("*.tar"))]
    limit_bytes = 3 * max(shard_bytes)
    assert limit_bytes < sum(shard_bytes)
    remote = make_loader("s3://datasets/demo/train", backend="dali", cache=cache_options(tmp_path, limit_bytes / 1e9),
                         **SETTINGS)
    expected = batches(make_loader(local_shards, backend="dali", **SETTINGS))
    got, peak_bytes = [], 0
    for batch in remote:
        got.append(batch)
        peak_bytes = max(peak_bytes, cached_bytes(tmp_path / "cache"))
    assert_same_batches(got, expected)
    assert 0 < peak_bytes <= limit_bytes
    assert remote.shards.cache.fetched_bytes > sum(shard_bytes) - limit_bytes  # it did evict and fetch again


def test_a_limit_below_one_window_of_shards_is_refused_with_the_fix(server, tmp_path):
    with pytest.raises(StorageError, match="raise data.cache_limit_gb or lower data.shuffle_window"):
        batches(make_loader("s3://datasets/demo/train", backend="dali", cache=cache_options(tmp_path, 1e-6),
                            **SETTINGS))


def test_processes_sharing_a_cache_fetch_each_shard_once(server, tmp_path):
    """Two readers of one cache folder (each its own cache object, as two ranks) fetch every shard once between
    them; the per-shard lock makes the second wait for the first."""
    readers = [ShardSet.from_path("s3://datasets/demo/train", tmp_path / "cache", 10**9, 2, 0.05) for _ in range(2)]
    threads = [threading.Thread(target=lambda shards=shards: [shards.cache.paths(number)
                                                               for number in range(len(shards.names))])
               for shards in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total_bytes = sum(shard.total_bytes for shard in readers[0].cache.shards)
    assert sum(shards.cache.fetched_bytes for shards in readers) == total_bytes


def test_a_corrupted_object_is_fetched_again_then_refused(local_shards, server, tmp_path, caplog):
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    for path in local_shards.iterdir():
        data = bytearray(path.read_bytes())
        if path.name == "000002.tar":
            data[700] ^= 0xFF  # same size, other bytes
        (corrupted / path.name).write_bytes(bytes(data))
    server.upload_folder(corrupted, "s3://datasets/corrupted/train")
    shards = ShardSet.from_path("s3://datasets/corrupted/train", tmp_path / "cache", 10**9, 2, 0.05)
    shards.cache.paths(0)  # an intact shard of the set is fine
    with caplog.at_level(logging.WARNING, logger="datapipe"), \
            pytest.raises(ShardRefused, match=r"corrupted/train/000002.tar: its sha256 differs.*fetched twice"):
        shards.cache.paths(2)
    assert "fetching it once more" in caplog.text
    assert not list((tmp_path / "cache").glob("*000002*.tar*"))  # nothing of it is kept


def test_missing_bucket_manifest_and_bad_credentials_say_what_to_fix(server, tmp_path, monkeypatch):
    options = cache_options(tmp_path)
    with pytest.raises(StorageError, match="no such bucket"):
        make_loader("s3://no-such-bucket/train", backend="dali", cache=options, **SETTINGS)
    with pytest.raises(StorageError, match="manifest.json: no such object"):
        make_loader("s3://datasets/nothing-here", backend="dali", cache=options, **SETTINGS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="access denied.*AWS_ACCESS_KEY_ID"):
        make_loader("s3://datasets/demo/train", backend="dali", cache=options, **SETTINGS)


def test_no_credentials_anywhere_says_how_to_give_them(server, tmp_path, monkeypatch):
    """No key in the environment, empty credential and config files, no instance metadata: botocore finds none."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        if name not in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(name)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match=r"^reading s3://datasets/demo/train/manifest.json: no credentials found "
                                           r"\(NoCredentialsError: .*\); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                           r"or AWS_PROFILE"):
        make_loader("s3://datasets/demo/train", backend="dali", cache=cache_options(tmp_path), **SETTINGS)


def test_the_config_check_reads_remote_shards_through_the_configs_cache(server, tmp_path):
    """What `make pretrain OUT=s3://...` runs before torchrun (and train.pretrain on every rank)."""
    from train.config import parse_command_line

    config = parse_command_line(["--config", "harmony/demo", "data.shards=s3://datasets/demo/train",
                                 f"data.cache_dir={tmp_path / 'cache'}"], "")
    assert config.data.shards == "s3://datasets/demo/train"
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [MARKER]  # made, nothing fetched


def test_a_missing_bucket_is_one_line_from_the_config_check(server, tmp_path):
    checked = subprocess.run([sys.executable, "-m", "train.config", "--config", "harmony/demo",
                              "data.shards=s3://no-such-bucket/train", f"data.cache_dir={tmp_path / 'cache'}"],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1 and checked.stderr.count("\n") == 1, checked.stderr
    assert checked.stderr.startswith("config error: reading s3://no-such-bucket/train/manifest.json: no such bucket")


def test_make_compare_fingerprints_a_remote_set_as_its_local_copy(local_shards, server):
    from comparison.run import shards_digest

    local = shards_digest(str(local_shards))
    assert shards_digest(["s3://datasets/demo/train", str(local_shards)]) == [local, local]
    with pytest.raises(StorageError, match="reading s3://no-such-bucket/train/manifest.json: no such bucket"):
        shards_digest("s3://no-such-bucket/train")


def test_a_cache_folder_of_other_files_is_refused(server, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "000000.tar").write_bytes(b"the user's own file")
    with pytest.raises(StorageError, match="is not a shard cache"):
        make_loader("s3://datasets/demo/train", backend="dali",
                    cache=CacheOptions(folder=tmp_path / "mine", limit_gb=1.0), **SETTINGS)
    assert (tmp_path / "mine" / "000000.tar").read_bytes() == b"the user's own file"
    assert not (tmp_path / "mine" / MARKER).exists()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_server_gone_mid_epoch_is_retried_then_named_and_the_resumed_epoch_matches(local_shards, server, tmp_path,
                                                                                      caplog, backend):
    limit_gb = 4 * max(path.stat().st_size + 400 for path in local_shards.glob("*.tar")) / 1e9
    settings = dict(SETTINGS, backend=backend, cache=cache_options(tmp_path, limit_gb))
    expected = batches(make_loader(local_shards, **{**SETTINGS, "backend": backend}))
    loader = make_loader("s3://datasets/demo/train", **settings)
    got = []
    try:
        with caplog.at_level(logging.WARNING, logger="datapipe"), \
                pytest.raises(StorageError, match=r"000\d+\.(tar|idx): the connection failed 3 times"):
            for batch in loader:
                got.append(batch)
                saved = loader.state_dict()  # what a checkpoint after this step holds
                if len(got) == 2:
                    server.relay.cut()
    finally:
        server.relay.restore()
    if backend == "dali":  # torch's workers log in their own processes
        assert "try 2 of 3" in caplog.text
    assert 2 <= len(got) < len(expected)
    resumed = make_loader("s3://datasets/demo/train", **settings)
    resumed.load_state_dict(saved)
    assert_same_batches(got + batches(resumed), expected)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_training_on_remote_shards_logs_the_local_losses(local_shards, server, tmp_path, backend):
    """Through a cache smaller than the dataset, from the command line as `make pretrain OUT=s3://...` runs it (the
    loader tests above show both backends give the local batches)."""
    from train.pretrain import main, train

    limit_gb = 4 * max(path.stat().st_size + 400 for path in local_shards.glob("*.tar")) / 1e9
    common = ("run.max_steps=2", f"data.backend={backend}", "data.shuffle_window=8")
    train(tiny_config(local_shards, tmp_path / "local", *common))
    main(["--config", "harmony/demo", *TINY_MODEL, "data.shards=s3://datasets/demo/train", f"run.out_dir={tmp_path}",
          "run.name=remote", *common, f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit_gb={limit_gb}"])
    assert len(losses_logged(tmp_path / "remote")) == 2
    assert losses_logged(tmp_path / "remote") == losses_logged(tmp_path / "local")


def test_a_mixture_of_local_and_remote_sets_gives_the_all_local_batches(local_shards, server, tmp_path):
    """One cache for the remote set read twice per epoch, smaller than what the epoch reads from it."""
    limit_gb = 4 * max(path.stat().st_size + 400 for path in local_shards.glob("*.tar")) / 1e9
    other = write_training_shards(tmp_path / "other", np.full((12, 40, 48, 3), 90, dtype=np.uint8), 8)
    settings = dict(SETTINGS, backend="dali", mix_weights=[0.5, 2])
    expected = batches(make_loader([other, local_shards], **settings))
    got = batches(make_loader([other, "s3://datasets/demo/train"], cache=cache_options(tmp_path, limit_gb),
                              **settings))
    assert len(got) == (6 + 88) // 4
    assert_same_batches(got, expected)


def test_publishing_uploads_what_changed_manifest_last_and_removes_what_it_no_longer_lists(server, tmp_path):
    from datapipe.shards.publish import publish

    images = np.random.default_rng(3).integers(0, 256, (24, 40, 48, 3), dtype=np.uint8)
    built = write_training_shards(tmp_path / "train", images, samples_per_shard=8)
    with_manifest_hashes(built)
    fs = server.filesystem()
    fs.pipe_file("datasets/published/train/notes.txt", b"the owner's own object")
    uploaded, removed = publish(built, "s3://datasets/published/train")
    assert uploaded[-1] == "manifest.json" and removed == []
    assert set(uploaded) == {"000000.tar", "000000.idx", "000001.tar", "000001.idx", "000002.tar", "000002.idx",
                             "manifest.json"}
    # Rebuilt: shard 1 has other images, shard 2 is gone.
    for path in built.iterdir():
        path.unlink()
    images[8:16] = 255 - images[8:16]
    write_training_shards(built, images[:16], samples_per_shard=8)
    with_manifest_hashes(built)
    uploaded, removed = publish(built, "s3://datasets/published/train")
    assert uploaded == ["000001.tar", "000001.idx", "manifest.json"]
    assert removed == ["000002.idx", "000002.tar"]
    names = {path.rsplit("/", 1)[-1] for path in fs.ls("datasets/published/train", refresh=True)}
    assert names == {"000000.tar", "000000.idx", "000001.tar", "000001.idx", "manifest.json", "notes.txt"}
    assert fs.cat_file("datasets/published/train/000001.tar") == (built / "000001.tar").read_bytes()
    loader = make_loader("s3://datasets/published/train", backend="dali", cache=cache_options(tmp_path), **SETTINGS)
    assert len(batches(loader)) == 16 // 4


@pytest.mark.slow
def test_download_and_shards_with_out_in_a_bucket(server, tmp_path):
    """What `make download OUT=s3://...`, `make shards OUT=s3://...` and `make verify OUT=s3://...` run:
    img2dataset writes the raw shards to the bucket; make shards stages them, builds locally and publishes;
    verify checks a copy; the loader reads the result."""
    import demo.download
    from datapipe import shards
    from datapipe.shards.publish import publish, stage

    totals, _ = demo.download.download_demo("s3://datasets/e2e/raw", demo_size=24, processes=1, threads=4,
                                            staging=tmp_path / "staging")
    raw_names = {path.rsplit("/", 1)[-1] for path in server.filesystem().ls("datasets/e2e/raw")}
    assert {"00000.tar", "00000.parquet", "00000_stats.json"} <= raw_names
    assert not list((tmp_path / "staging" / "raw").glob("*.tar"))  # img2dataset wrote to the bucket only
    stage("s3://datasets/e2e/raw", tmp_path / "staging" / "raw")
    manifest = shards.build(tmp_path / "staging" / "raw", tmp_path / "staging" / "train", samples_per_shard=10,
                            processes=1)
    assert manifest["reconciliation"]["in_raw"] == totals["successes"]
    publish(tmp_path / "staging" / "train", "s3://datasets/e2e/train")
    stage("s3://datasets/e2e/train", tmp_path / "published")  # what `make verify OUT=s3://...` checks
    assert shards.verify(tmp_path / "published") == []
    loader = make_loader("s3://datasets/e2e/train", backend="dali", cache=cache_options(tmp_path), **SETTINGS)
    assert len([key for batch in loader for key in batch.keys]) == manifest["totals"]["samples"] // 4 * 4


def test_a_download_into_a_missing_bucket_stops_before_it_starts(server, tmp_path):
    import demo.download

    with pytest.raises(SystemExit, match="no such bucket"):
        demo.download.download_demo("s3://no-such-bucket/raw", staging=tmp_path / "staging")


def test_retrieval_pairs_read_from_a_bucket(server, tmp_path):
    from conftest import jpeg_bytes

    from evaluation.datasets import open_eval_set

    pairs = tmp_path / "heldout_pairs"
    pairs.mkdir()
    shard_io.write_tar(pairs / "00000.tar", [{"__key__": f"{number:04d}", "jpg": jpeg_bytes(40 + number),
                                               "txt": f"caption {number}".encode()} for number in range(3)])
    server.upload_folder(pairs, "s3://datasets/heldout_pairs")
    eval_set = open_eval_set("s3://datasets/heldout_pairs")
    images, captions = zip(*eval_set.samples(), strict=True)
    assert eval_set.kind == "retrieval" and captions == (["caption 0"], ["caption 1"], ["caption 2"])
    assert [Image.open(io.BytesIO(image.data)).size for image in images] == [(40, 80), (41, 80), (42, 80)]


def test_the_cache_evicts_the_shard_read_farthest_ahead_and_used_up_shards_first(server, tmp_path):
    shards = ShardSet.from_path("s3://datasets/demo/train", tmp_path / "cache", 10**9, 2, 0.05)
    schedule = ShardSchedule(epoch_order(shards, seed=5, epoch=0, shuffle_window=8), global_batch_size=4)
    by_slot = schedule.shard_in_order.tolist()  # seed 5 puts the 4-sample shard last: slot k is read in window k
    totals = sorted(shard.total_bytes for shard in shards.cache.shards)
    limit_bytes = sum(totals[-3:])
    assert limit_bytes < sum(totals[:4])  # room for three shards, not four
    cache = ShardCache(tmp_path / "cache", limit_bytes, shards.cache.shards)
    cache.follow(schedule)

    def cached_slots():
        return {slot for slot, shard in enumerate(by_slot) if cache.shards[shard].stem + ".tar" in
                {path.name for path in (tmp_path / "cache").glob("*.tar")}}

    for slot in (1, 4, 2):
        cache.paths(by_slot[slot])
    cache.paths(by_slot[3])  # read in window 3: makes room by evicting slot 4's shard (window 4), not 1 or 2
    assert cached_slots() == {1, 2, 3}
    schedule.advance(3 * 8)  # now in window 3: the shards of slots 1 and 2 are done with this epoch
    cache.paths(by_slot[5])
    assert len(cached_slots() & {1, 2}) == 1 and {3, 5} <= cached_slots()


def test_a_server_gone_mid_training_fails_the_run_at_its_last_checkpoint_and_the_resume_matches(local_shards, server,
                                                                                                 tmp_path):
    """`make pretrain` on s3:// shards through a cache of 4 of the 6 shards, the network cut after step 2: the trainer
    retries, stops with one line naming the shard and keeps its checkpoints; run again, it passes the step it failed
    at as a run never cut does (on the local copy, whose losses the remote shards give)."""
    from test_cluster import REPO, logged_steps

    from train.pretrain import main, train
    from train.run_folder import read_status

    limit_gb = 4 * max(path.stat().st_size + 400 for path in local_shards.glob("*.tar")) / 1e9
    common = (*TINY_MODEL, "data.batch_size=4", "data.shuffle_window=8")  # an epoch: 11 steps, every shard
    arguments = ["--config", "harmony/demo", *common, "data.shards=s3://datasets/demo/train", f"run.out_dir={tmp_path}",
                 "run.name=remote", "run.checkpoint_every=2", "data.num_workers=1",
                 f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit_gb={limit_gb}", "data.fetch_retries=2",
                 "data.fetch_retry_wait_s=0.01"]
    run = tmp_path / "remote"
    # Two epochs: the second reads every shard, so one is fetched after the cut whatever the cache holds then.
    trainer = subprocess.Popen([sys.executable, "-m", "train.pretrain", *arguments, "run.max_steps=22"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while len(logged_steps(run)) < 2:
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.05)
        server.relay.cut()
        errors = trainer.communicate(timeout=120)[1]
    finally:
        server.relay.restore()
    assert trainer.returncode == 1 and "Traceback" not in errors, errors[-3000:]
    assert "; try 3 of 3 in" in errors  # the worker's warnings
    stopped = [line for line in errors.splitlines() if line.startswith("rank 0: stopped by")]
    assert len(stopped) == 1 and re.match(r"rank 0: stopped by StorageError: downloading s3://datasets/demo/train/"
                                          r"000\d+\.(tar|idx): the connection failed 3 times .*training resumes from "
                                          r"its last checkpoint\)$", stopped[0]), errors[-3000:]
    status = read_status(run)
    assert status["state"] == "failed" and "s3://datasets/demo/train/000" in status["error"], status
    last_logged = logged_steps(run)[-1]
    _, saved = checkpoint.latest_good(run)
    assert logged_steps(run) == list(range(1, last_logged + 1)) and saved["step"] == last_logged - last_logged % 2
    main([*arguments, f"run.max_steps={last_logged + 2}"])  # past the step that could not be fetched
    train(tiny_config(local_shards, tmp_path / "local", *common, f"run.max_steps={last_logged + 2}"))
    assert logged_steps(run) == list(range(1, last_logged + 3))
    assert losses_logged(run) == losses_logged(tmp_path / "local")
