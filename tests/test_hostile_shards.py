"""Raw shards, manifests and remote folders made to harm: `make shards`, `make verify`, the loader and publish
refuse them in one line or reject what is wrong with a logged reason, and never read what a header only declares."""

import io
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, tmpfs, write_raw_shard, write_training_shards

from datapipe import shards
from datapipe.common import manifest, shard_io
from datapipe.load.samples import ShardSet
from datapipe.shards.cli import main as shards_main

SPARSE_BYTES = 256 << 20  # what a sparse member declares: far over the 64 MiB cap, a few kB in the tar


def sparse_member(name, data, real_size):
    """(header, stored bytes) of a GNU sparse member (PAX format 1.0): `data` at offset 0, then a hole up to
    `real_size` bytes that tarfile would fill with zeros when read."""
    stored = f"1\n0\n{len(data)}\n".encode().ljust(512, b"\0") + data  # the sparse map, then the data
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(stored)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(real_size)}
    return info, stored


def rewrite_raw_tar(raw_tar, member):
    """Write the raw tar again, member by member; member(name, data) gives the (header, bytes) to write."""
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in shard_io.read_samples([raw_tar])]
    with tarfile.open(raw_tar, "w", format=tarfile.PAX_FORMAT) as archive:
        for sample in samples:
            for extension in sorted(name for name in sample if not name.startswith("__")):
                info, data = member(f"{sample['__key__']}.{extension}", sample[extension])
                archive.addfile(info, io.BytesIO(data))


def as_it_is(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def raw_shard(raw_dir, count=3):
    write_raw_shard(raw_dir, 0, [(jpeg_bytes(96 + i, 80), f"picture number {i}") for i in range(count)])
    return raw_dir / "00000.tar"


def rejected_reasons(train):
    return {row["key"]: row["reason"] for row in manifest.read_rejected(train / manifest.REJECTED)}


def kept_keys(train):
    return [sample["__key__"] for sample in shard_io.read_samples(sorted(train.glob("*.tar")))]


# --- 1. sizes a header declares are limits checked before reading ------------------------------------------


def test_a_sparse_member_is_never_read_and_its_sample_is_rejected_with_the_reason(tmp_path):
    raw_tar = raw_shard(tmp_path / "raw")
    rewrite_raw_tar(raw_tar, lambda name, data: sparse_member(name, data, SPARSE_BYTES)
                    if name == "000000001.jpg" else as_it_is(name, data))
    assert raw_tar.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        samples = list(shard_io.read_samples([raw_tar], max_member_bytes=shards.ImageRules().max_member_bytes))
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_bytes < 16 << 20  # the 256 MiB the header declares was never allocated
    refused = samples[1]["jpg"]
    assert isinstance(refused, shard_io.RefusedMember) and refused.reason == "sparse_member"

    result = shards.build(tmp_path / "raw", tmp_path / "train", processes=1)
    assert rejected_reasons(tmp_path / "train") == {"000000001": "sparse_member"}
    assert kept_keys(tmp_path / "train") == ["000000000", "000000002"]
    assert result["reconciliation"]["shards_balanced"] and shards.verify(tmp_path / "train") == []


def test_a_member_over_the_size_limit_is_rejected_from_its_header(tmp_path):
    raw_tar = raw_shard(tmp_path / "raw")
    padded = {"000000002.jpg"}  # a JPEG with 40 kB of zeros after it still decodes: only the limit stops it
    rewrite_raw_tar(raw_tar, lambda name, data: as_it_is(name, data + bytes(40000) if name in padded else data))
    shards_main(["build", str(tmp_path / "raw"), str(tmp_path / "train"), "--processes", "1",
                 "--max-member-bytes", "30000"])
    logged = manifest.read_rejected(tmp_path / "train" / manifest.REJECTED)
    assert [(row["key"], row["reason"]) for row in logged] == [("000000002", "member_too_large")]
    assert "declares 4" in logged[0]["detail"] and "over the limit of 30000" in logged[0]["detail"]
    assert kept_keys(tmp_path / "train") == ["000000000", "000000001"]
    assert shards.verify(tmp_path / "train") == []


# --- 2. member names that climb out of their folder -----------------------------------------------------


def test_member_names_that_climb_out_are_rejected_and_never_become_keys(tmp_path):
    raw_tar = raw_shard(tmp_path / "raw")
    renamed = {"000000001": "../outside/000000001", "000000002": "/etc/000000002"}
    rewrite_raw_tar(raw_tar, lambda name, data: as_it_is(renamed.get(name.split(".")[0], name.split(".")[0])
                                                         + "." + name.split(".", 1)[1], data))
    parquet = tmp_path / "raw" / "00000.parquet"
    rows = pq.read_table(parquet).to_pylist()
    for row in rows:  # the parquet lists them by the same names: only the names are wrong
        row["key"] = renamed.get(row["key"], row["key"])
    pq.write_table(pa.Table.from_pylist(rows), parquet)

    result = shards.build(tmp_path / "raw", tmp_path / "train", processes=1)
    assert rejected_reasons(tmp_path / "train") == {"../outside/000000001": "unsafe_member_name",
                                                    "/etc/000000002": "unsafe_member_name"}
    assert kept_keys(tmp_path / "train") == ["000000000"]
    assert result["reconciliation"]["shards_balanced"] and shards.verify(tmp_path / "train") == []


# --- 3. a raw tar that disagrees with its parquet ----------------------------------------------------------


@pytest.mark.parametrize("listed_rows, message", [
    (slice(0, 2), r"holds 1 sample\(s\) its parquet does not list as downloaded \(first: '000000002'\)"),
    (slice(0, 4), r"lacks 1 sample\(s\) its parquet lists as downloaded \(first: '000000003'\)"),
], ids=["more_in_the_tar", "fewer_in_the_tar"])
def test_a_raw_tar_that_disagrees_with_its_parquet_is_refused_and_verify_agrees(tmp_path, listed_rows, message):
    write_raw_shard(tmp_path / "raw", 0, [(jpeg_bytes(96 + i, 80), f"picture number {i}") for i in range(4)])
    raw_tar = tmp_path / "raw" / "00000.tar"
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in shard_io.read_samples([raw_tar])]
    shard_io.write_tar(raw_tar, samples[:3])  # the tar holds 3 samples
    parquet = tmp_path / "raw" / "00000.parquet"
    pq.write_table(pa.Table.from_pylist(pq.read_table(parquet).to_pylist()[listed_rows]), parquet)
    with pytest.raises(SystemExit, match=rf"^error: raw shard '.*00000.tar' {message}: .* Delete it, 00000.parquet "
                                         r"and 00000_stats.json, then run `make download` again") as refused:
        shards.build(tmp_path / "raw", tmp_path / "train", processes=1)
    assert "\n" not in str(refused.value)
    assert any("run `make shards` first" in problem for problem in shards.verify(tmp_path / "train"))


# --- 4. a local manifest naming files outside its folder ----------------------------------------------


@pytest.mark.parametrize("outside_name", ["../outside/000000.tar", "ABSOLUTE"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, outside_name):
    images = np.zeros((4, 40, 48, 3), dtype=np.uint8)
    outside = write_training_shards(tmp_path / "outside", images, samples_per_shard=4)
    train = write_training_shards(tmp_path / "train", images, samples_per_shard=4)
    name = str(outside / "000000.tar") if outside_name == "ABSOLUTE" else outside_name
    tar_path = outside / "000000.tar"
    entry = dict(name=name, samples=4, bytes=tar_path.stat().st_size, sha256=shard_io.sha256_file(tar_path))
    (train / manifest.MANIFEST).write_text(json.dumps(dict(shards=[entry], totals={}, reconciliation={})))
    expected = rf"{train / manifest.MANIFEST}: shards\[0\] 'name' is '{name}': a manifest names files in its own"
    with pytest.raises(manifest.ManifestError, match=expected):
        ShardSet.from_path(train)
    assert [problem for problem in shards.verify(train) if "shards[0] 'name'" in problem] == \
        [f"{train / manifest.MANIFEST}: shards[0] 'name' is '{name}': a manifest names files in its own folder, "
         "never a path (absolute, or with '..' or '/'); rebuild the shards with `make shards` (or re-publish them)"]


# --- 8. a read-only OUT -----------------------------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no write reaches: a read-only tmpfs for root (who may write anywhere), else a folder mode 0555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m"):
        yield folder


@pytest.mark.parametrize("inside", [False, True], ids=["out_is_read_only", "out_is_under_a_read_only_folder"])
def test_a_read_only_out_is_refused_in_one_line(tmp_path, read_only_folder, inside):
    raw_shard(tmp_path / "raw", count=1)
    out = read_only_folder / "train" if inside else read_only_folder
    with pytest.raises(SystemExit, match=rf"^error: cannot write to OUT '{out}' \(.*\): make the folder writable "
                                         r"\(chmod u\+w, or remount it read-write\) or build into another OUT$"):
        shards.build(tmp_path / "raw", out, processes=1)


# --- object storage: 5. remote manifests of the wrong shape, 6. `publish get` of '..', 7. re-publishing -----


@pytest.fixture(scope="module")
def server():
    from tools.s3_loopback import S3Server

    server = S3Server().start()
    server.filesystem().mkdir("hostile")
    yield server
    server.stop()


def published(server, tmp_path, location, shard_count=3):
    """Training shards (tar, index, a manifest with what `make shards` records) published to `location`."""
    from datapipe.shards.publish import publish

    images = np.random.default_rng(shard_count).integers(0, 256, (4 * shard_count, 40, 48, 3), dtype=np.uint8)
    built = write_training_shards(tmp_path / f"train{shard_count}", images, samples_per_shard=4)
    recorded = json.loads((built / manifest.MANIFEST).read_text())
    for entry in recorded["shards"]:
        tar_path = built / entry["name"]
        entry.update(bytes=tar_path.stat().st_size, sha256=shard_io.sha256_file(tar_path),
                     index=tar_path.with_suffix(".idx").name,
                     index_sha256=shard_io.sha256_file(tar_path.with_suffix(".idx")))
    (built / manifest.MANIFEST).write_text(json.dumps(recorded))
    publish(built, f"s3://hostile/{location}")
    return built


@pytest.mark.network
@pytest.mark.parametrize("content, problem", [
    ('[{"name": "000000.tar"}]', r" is a JSON list, not an object with a 'shards' list"),
    ('{"shards": [{"name": "000000.tar", "samples": 4}]}', r": shards\[0\] has no 'bytes'"),
    ('{"shards": {"000000.tar": 4}}', r" has no 'shards' list"),
    ('{"shards": [{"name": "../../demo/train/000000.tar", "samples": 4, "bytes": 1, "sha256": "0"}]}',
     r": shards\[0\] 'name' is '../../demo/train/000000.tar': a manifest names files in its own folder"),
], ids=["a_list", "a_shard_without_fields", "shards_not_a_list", "a_shard_outside"])
def test_a_remote_manifest_of_the_wrong_shape_is_one_line_naming_it(server, tmp_path, content, problem):
    from datapipe.common.object_store import StorageError

    server.filesystem().pipe_file("hostile/shape/manifest.json", content.encode())
    with pytest.raises(StorageError, match=rf"^s3://hostile/shape/manifest.json{problem}.*; rebuild the shards"):
        ShardSet.from_path("s3://hostile/shape", tmp_path / "cache", 10**9, 0, 0.01)
    assert not list((tmp_path / "cache").glob("**/*.tar*"))


@pytest.mark.network
def test_getting_an_object_named_dot_dot_is_refused_and_leaves_nothing(server, tmp_path):
    import boto3

    from datapipe.shards.publish import main as publish_main

    client = boto3.session.Session().client("s3")  # a new session reads the keys the server made
    client.put_object(Bucket="hostile", Key="get/00000.tar", Body=b"a raw shard")
    client.put_object(Bucket="hostile", Key="get/..", Body=b"an object named '..'")
    local = tmp_path / "staging" / "raw"
    with pytest.raises(SystemExit, match=r"^error: s3://hostile/get holds an object named '\.\.', which is not a "
                                         r"plain file name and would be copied outside .*raw: nothing was copied"):
        publish_main(["get", "s3://hostile/get", str(local)])
    assert not (tmp_path / "staging").exists()


@pytest.mark.network
def test_republishing_removes_only_what_this_project_wrote_and_says_what_it_left(server, tmp_path, capsys):
    from datapipe.shards.publish import publish

    fs = server.filesystem()
    first = published(server, tmp_path, "republish", shard_count=3)
    # The owner keeps files of their own there, and the remote manifest was edited to list them.
    fs.pipe_file("hostile/republish/notes.txt", b"the owner's notes")
    fs.pipe_file("hostile/republish/000009.tar", b"the owner's own tar, named like a shard")
    recorded = json.loads(fs.cat_file("hostile/republish/manifest.json"))
    recorded["shards"] += [dict(name="notes.txt", samples=1, bytes=17,
                                sha256=shard_io.sha256_file(first / "000000.tar")),
                           dict(name="000009.tar", samples=1, bytes=39, sha256="0" * 64, index="000000.idx")]
    fs.pipe_file("hostile/republish/manifest.json", json.dumps(recorded).encode())
    capsys.readouterr()

    second = tmp_path / "rebuilt"
    second.mkdir()
    for path in first.iterdir():  # one shard fewer
        if not path.name.startswith("000002"):
            (second / path.name).write_bytes(path.read_bytes())
    recorded = json.loads((first / manifest.MANIFEST).read_text())
    recorded["shards"] = recorded["shards"][:2]
    (second / manifest.MANIFEST).write_text(json.dumps(recorded))
    _, removed = publish(second, "s3://hostile/republish")

    assert removed == ["000002.idx", "000002.tar"]
    names = {path.rsplit("/", 1)[-1] for path in fs.ls("hostile/republish", refresh=True)}
    assert names == {"000000.tar", "000000.idx", "000001.tar", "000001.idx", "manifest.json", "notes.txt",
                     "000009.tar"}
    said = capsys.readouterr().out
    assert ("left alone in s3://hostile/republish: 2 object(s) the earlier manifest listed that this project cannot "
            "show it wrote: notes.txt (not a name `make shards` gives); 000009.tar (its 39 bytes are not those the "
            "earlier manifest recorded: another sha256)") in said
