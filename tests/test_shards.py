import json
import os

import pytest

from datapipe import shards
from datapipe.common import captions, manifest, shard_io
from datapipe.common.byte_sizes import readable_bytes
from tests.conftest import jpeg_bytes, write_raw_shard


def build_small(tmp_path, **kwargs):
    """Two raw shards with one sample per rejection reason, a duplicate and 2 download failures."""
    raw = tmp_path / "raw"
    good = [(jpeg_bytes(96 + i, 80), f"picture number {i}") for i in range(7)]
    write_raw_shard(raw, 0, good[:4] + [(jpeg_bytes()[:200], "broken"), (jpeg_bytes(30, 30), "tiny")],
                    failures=["HTTP Error 404"])
    write_raw_shard(raw, 1, good[4:] + [(jpeg_bytes(96, 80), "same pixels as 00000000"),
                                        (jpeg_bytes(500, 90), "too wide"), (jpeg_bytes(97, 80), "  \n")],
                    failures=["timeout"])
    return raw, shards.build(raw, tmp_path / "train", samples_per_shard=3, processes=2, **kwargs)


def test_rejections_reconcile_and_are_logged(tmp_path):
    _, result = build_small(tmp_path)
    counts = result["reconciliation"]
    assert counts["rejected"] == {"aspect_ratio": 1, "duplicate": 1, "empty_caption": 1,
                                  "too_small": 1, "undecodable": 1}
    assert (counts["url_list_rows"], counts["in_raw"], counts["kept"]) == (14, 12, 7)
    assert counts["download_balanced"] and counts["shards_balanced"]
    logged = manifest.read_rejected(tmp_path / "train" / manifest.REJECTED)
    assert len(logged) == 5 + 2 and all(r["url"] and r["reason"] for r in logged)
    duplicate = next(r for r in logged if r["reason"] == "duplicate")
    assert duplicate["key"] == "000010003" and duplicate["detail"] == "same pixels as 000000000"
    assert "every url is accounted for: yes" in (tmp_path / "train" / manifest.REPORT).read_text().lower()


def test_fixed_size_shards_with_stable_keys_and_all_fields(tmp_path):
    _, result = build_small(tmp_path)
    assert [entry["samples"] for entry in result["shards"]] == [3, 3, 1]
    samples = list(shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar"))))
    assert [s["__key__"] for s in samples] == [f"00000000{i}" for i in range(4)] + [f"00001000{i}" for i in range(3)]
    first = samples[0]
    assert set(first) >= {"jpg", "txt", "tokens", "json"}
    assert first["txt"] == b"picture number 0"
    tokens = captions.tokens_from_bytes(first["tokens"])
    assert tokens.shape == (captions.CONTEXT_LENGTH,) and tokens[0] == captions.SOT_ID
    info = json.loads(first["json"])
    assert info["url"].endswith("000000000.jpg") and info["source"] == "00000.tar"


def test_rebuild_skips_finished_shards_and_gives_identical_bytes(tmp_path):
    build_small(tmp_path)
    train = tmp_path / "train"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in train.glob("*.tar")}
    (train / "000001.tar").unlink()
    (train / "000001.tar.partial").write_bytes(b"half written")  # a killed earlier run
    build_small(tmp_path)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in train.glob("*.tar")}
    assert after["000000.tar"] == before["000000.tar"]  # skipped: not even rewritten
    assert after["000001.tar"][1] == before["000001.tar"][1]  # rebuilt byte for byte
    assert shards.verify(train) == []


def test_verify_catches_corruption_and_bad_indexes(tmp_path):
    build_small(tmp_path)
    train = tmp_path / "train"
    assert shards.verify(train) == []
    index = train / "000000.idx"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    assert any("keys differ" in problem for problem in shards.verify(train))
    with open(train / "000001.tar", "r+b") as tar:
        tar.seek(600)
        tar.write(b"XXXX")
    assert any("sha256 differs" in problem for problem in shards.verify(train))


def test_verify_command_exit_status(tmp_path, capsys):
    build_small(tmp_path)
    shards.main(["verify", str(tmp_path / "train")])
    assert "verify ok" in capsys.readouterr().out
    os.remove(tmp_path / "train" / "000002.tar")
    with pytest.raises(SystemExit, match="verify failed"):
        shards.main(["verify", str(tmp_path / "train")])


def test_zstd_shards_hold_the_same_samples(tmp_path):
    _, plain = build_small(tmp_path)
    compressed_dir = tmp_path / "zst"
    shards.build(tmp_path / "raw", compressed_dir, samples_per_shard=3, processes=1, compress=True)
    plain_samples = list(shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar"))))
    zst_samples = list(shard_io.read_samples(sorted(compressed_dir.glob("*.tar.zst"))))
    strip = lambda s: {k: v for k, v in s.items() if k != "__url__"}  # noqa: E731
    assert [strip(s) for s in zst_samples] == [strip(s) for s in plain_samples]
    assert not list(compressed_dir.glob("*.idx")) and shards.verify(compressed_dir) == []


def test_missing_raw_shards_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="run `make download` first"):
        shards.build(tmp_path / "nothing", tmp_path / "train")


def test_corrupt_raw_shard_is_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(96 + i, 80), f"picture {i}") for i in range(3)])
    data = (raw / "00000.tar").read_bytes()
    (raw / "00000.tar").write_bytes(data[:1000])  # a download killed while writing
    with pytest.raises(SystemExit, match=r"raw shard '.*00000.tar' cannot be read.*make download"):
        shards.build(raw, tmp_path / "train", processes=1)


# --- never stale, never silent ---------------------------------------------------------------------

def keys_and_captions(train):
    return [(s["__key__"], s["txt"].decode()) for s in shard_io.read_samples(sorted(train.glob("*.tar")))]


def test_a_new_download_in_raw_replaces_the_old_samples(tmp_path):
    raw, _ = build_small(tmp_path)
    for path in raw.iterdir():
        path.unlink()
    write_raw_shard(raw, 0, [(jpeg_bytes(120 + i, 90, color=(10, 200, 10)), f"new picture {i}") for i in range(5)])
    result = shards.build(raw, tmp_path / "train", samples_per_shard=3, processes=2)
    assert [caption for _, caption in keys_and_captions(tmp_path / "train")] == [f"new picture {i}" for i in range(5)]
    assert result["reconciliation"]["in_raw"] == 5 and shards.verify(tmp_path / "train") == []
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["000000.tar", "000001.tar"]


def test_changed_rules_change_the_decisions(tmp_path):
    raw, before = build_small(tmp_path)
    assert before["totals"]["samples"] == 7
    after = shards.build(raw, tmp_path / "train", samples_per_shard=3, processes=2,
                         rules=shards.ImageRules(max_aspect_ratio=1.25))  # 101 x 80 and 102 x 80 now too wide
    assert after["rules"]["max_aspect_ratio"] == 1.25
    assert after["reconciliation"]["rejected"]["aspect_ratio"] == 3 and after["totals"]["samples"] == 5
    kept = [json.loads(s["json"]) for s in shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar")))]
    assert len(kept) == 5 and all(info["width_px"] / info["height_px"] <= 1.25 for info in kept)


def test_resharding_leaves_only_what_the_manifest_lists(tmp_path):
    raw, _ = build_small(tmp_path)
    result = shards.build(raw, tmp_path / "train", samples_per_shard=5, processes=2)
    listed = {entry["name"] for entry in result["shards"]} | {entry["index"] for entry in result["shards"]}
    on_disk = {p.name for p in (tmp_path / "train").iterdir() if p.is_file() and p.suffix in (".tar", ".idx")}
    assert on_disk == listed and len(result["shards"]) == 2
    assert not list((tmp_path / "train" / shards.WORK_DIR).glob("*.tar"))  # no second copy of the samples left


def test_duplicates_keep_the_first_in_key_order_whatever_the_tar_order(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(100, 80), "the original"), (jpeg_bytes(100, 80), "a later copy")])
    samples = list(shard_io.read_samples([raw / "00000.tar"]))  # img2dataset writes in completion order
    shard_io.write_tar(raw / "00000.tar", [{k: v for k, v in s.items() if k != "__url__"} for s in reversed(samples)])
    shards.build(raw, tmp_path / "train", processes=1)
    assert keys_and_captions(tmp_path / "train") == [("000000000", "the original")]


def test_a_raw_shard_without_its_stats_is_refused(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(100, 80), "a picture")])
    (raw / "00000_stats.json").unlink()  # the download stopped before img2dataset finished the shard
    with pytest.raises(SystemExit, match="has no 00000_stats.json: img2dataset did not finish it"):
        shards.build(raw, tmp_path / "train", processes=1)


@pytest.mark.parametrize("damage, settings, message", [
    (lambda raw, train: (raw / "00000_stats.json").write_text('{"count": 1, "succ'), {},
     r"'.*00000_stats.json' cannot be read \(JSONDecodeError: .*\): .* Delete 00000.tar and 00000_stats.json"),
    (lambda raw, train: (raw / "00000.parquet").write_bytes(b"PAR1 cut short"), {},
     r"'.*00000.parquet' cannot be read \(ArrowInvalid: .*Delete 00000.tar and 00000.parquet"),
    (lambda raw, train: train.write_text("a file"), {}, r"OUT '.*train' is a file, not a folder"),
    (None, {"samples_per_shard": 0}, r"--samples-per-shard \(SAMPLES_PER_SHARD\) must be .* at least 1 \(got 0\)"),
    (None, {"processes": 0}, r"--processes \(PROCESSES\) must be a whole number of at least 1 \(got 0\)"),
], ids=["stats_cut_short", "parquet_cut_short", "out_is_a_file", "no_samples_per_shard", "no_processes"])
def test_bad_inputs_are_refused_before_any_work(tmp_path, damage, settings, message):
    raw, train = tmp_path / "raw", tmp_path / "train"
    write_raw_shard(raw, 0, [(jpeg_bytes(100, 80), "a picture")])
    if damage:
        damage(raw, train)
    with pytest.raises(SystemExit, match=message):
        shards.build(raw, train, **{"processes": 1, **settings})
    assert not (train / shards.WORK_DIR).exists()  # refused before pass 1 started


def test_image_rules_that_would_reject_everything_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--max-aspect-ratio at least 1.0 \(got 64, 67108864 and 0.5\)"):
        shards.main(["build", str(tmp_path / "raw"), str(tmp_path / "train"), "--max-aspect-ratio", "0.5"])


def test_a_second_build_of_the_same_output_is_refused(tmp_path):
    from datapipe.common.folder_lock import FolderLock

    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(100, 80), "a picture")])
    busy = pytest.raises(SystemExit, match="in use by another `make shards`")
    with FolderLock(tmp_path / "train", "a test", ""), busy:
        shards.build(raw, tmp_path / "train", processes=1)


def test_disk_full_stops_with_the_folder_and_space_and_the_build_resumes(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, [(jpeg_bytes(100 + i, 80), f"picture {i}") for i in range(4)])
    train = tmp_path / "train"
    train.mkdir()
    (train / "000001.tar.partial").symlink_to("/dev/full")  # writing the second shard hits a full disk
    # A small build says its needs in KiB, not "0.0 GiB".
    with pytest.raises(SystemExit, match=r"the disk holding '.*train' is full .* needs about [1-9][0-9.]* KiB free"):
        shards.build(raw, train, samples_per_shard=2, processes=1)
    assert not (train / manifest.MANIFEST).exists()  # nothing looks complete
    (train / "000001.tar.partial").unlink()  # space freed
    result = shards.build(raw, train, samples_per_shard=2, processes=1)
    assert result["totals"]["samples"] == 4 and shards.verify(train) == []


def test_byte_counts_read_in_the_unit_that_fits():
    assert [readable_bytes(count) for count in (512, 3 * 2**10 + 400, 12 * 2**20, 5 * 2**29)] == [
        "512 bytes", "3.4 KiB", "12.0 MiB", "2.5 GiB"]


def test_done_records_of_an_earlier_version_or_cut_short_mean_the_shard_is_written_again(tmp_path):
    raw, _ = build_small(tmp_path)
    train = tmp_path / "train"
    (train / shards.WORK_DIR / "000000.done.json").write_text(json.dumps({"keys": ["000000000"]}))  # older layout
    (train / shards.WORK_DIR / "000001.done.json").write_text('{"made_from": {"wo')  # a write cut short
    written = {p.name: p.stat().st_mtime_ns for p in train.glob("*.tar")}
    shards.build(raw, train, samples_per_shard=3, processes=1)
    rewritten = {p.name for p in train.glob("*.tar") if p.stat().st_mtime_ns != written[p.name]}
    assert rewritten == {"000000.tar", "000001.tar"} and shards.verify(train) == []
