import json
import os

import pytest

from datapipe import manifest, shard_io, shards, text
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
    tokens = text.tokens_from_bytes(first["tokens"])
    assert tokens.shape == (text.CONTEXT_LENGTH,) and tokens[0] == text.SOT_ID
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
