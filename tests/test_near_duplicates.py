"""Near duplicates and evaluation-set decontamination: the exact bounded search, the quality of the rule on a
generated set, and `make shards` with EXCLUDE."""

import io
import itertools
import json
import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
from PIL import Image

from datapipe import shards
from datapipe.common import manifest, near_duplicates, shard_io
from tests.conftest import jpeg_bytes, write_raw_shard
from tools.bench.near_duplicates import jpeg, original, quality_set, scores, variant, write_raw


def planted_hashes(count, threshold, seed=0):
    """Random hashes, and copies of some with 0 to threshold + 2 bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = list(rng.integers(0, 2**63, count, dtype=np.int64).astype(np.uint64) * np.uint64(2)
                  + rng.integers(0, 2, count).astype(np.uint64))
    for source in rng.choice(count, count // 3, replace=False):
        flipped = rng.choice(64, int(rng.integers(0, threshold + 3)), replace=False)
        hashes.append(hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flipped)))
    return np.array(hashes, dtype=np.uint64)


def brute_force(hashes, threshold, first_reference):
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    first, second = np.nonzero(np.triu(distances <= threshold, k=1))
    wanted = first < first_reference
    order = np.lexsort((first[wanted], second[wanted]))
    return first[wanted][order], second[wanted][order], distances[first[wanted], second[wanted]][order]


@pytest.mark.parametrize("threshold", [0, 3, 8])
def test_the_table_search_finds_exactly_the_pairs_within_the_threshold(threshold):
    hashes = planted_hashes(1500, threshold)
    first_reference = 1800  # the last hashes play evaluation images: never paired with each other
    found = near_duplicates.near_pairs(hashes, threshold, first_reference)
    expected = brute_force(hashes, threshold, first_reference)
    assert len(expected[0]) > 100
    for ours, truth in zip(found, expected, strict=True):
        np.testing.assert_array_equal(ours, truth)


def test_the_tables_run_in_parallel_with_the_same_result(tmp_path):
    hashes = planted_hashes(1000, 6, seed=1)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        parallel = near_duplicates.near_pairs(hashes, 6, len(hashes), pool, tmp_path / "hashes.npy")
    for ours, alone in zip(parallel, near_duplicates.near_pairs(hashes, 6, len(hashes)), strict=True):
        np.testing.assert_array_equal(ours, alone)


@pytest.mark.parametrize("threshold, count", [(8, 3_000), (8, 12_000_000), (10, 50_000), (10, 1_000_000)])
def test_tables_cover_every_pair_within_the_threshold_with_keys_of_about_log2_n_bits(threshold, count):
    """Pigeonhole: any `threshold` flipped bits leave one table's key bits untouched. The keys have about
    log2(count) - 3 bits, so buckets stay small at CC12M size (12M hashes, 495 tables at 8 bits)."""
    masks = near_duplicates.table_masks(threshold, count)
    key_bits = [int(mask).bit_count() for mask in masks]
    assert min(key_bits) >= math.log2(count) - 4 and len(masks) <= 1001
    rng = np.random.default_rng(0)
    for _ in range(300):
        flipped = sum(1 << int(bit) for bit in rng.choice(64, threshold, replace=False))
        assert any(int(mask) & flipped == 0 for mask in masks)
    if (threshold, count) == (8, 12_000_000):
        assert len(masks) == math.comb(12, 4)


def test_screen_keeps_the_first_of_each_group_and_drops_what_overlaps_evaluation_images():
    # candidates 0-4, evaluation images 5-6; pairs (i, j, distance) sorted by (j, i)
    first, second, distances = (np.array(values) for values in zip(
        (0, 1, 2), (1, 2, 2), (0, 3, 2), (2, 3, 1), (3, 5, 4), (4, 5, 2), (4, 6, 1), strict=True))
    index, outcome, matched, distance = near_duplicates.screen(first, second, distances, candidates=5)
    assert index.tolist() == [1, 3, 4]
    # 1 looks like 0 (kept); 2 looked like 1, but 1 is itself a near duplicate, and 2 is not close to 0: kept;
    # 3 overlaps evaluation image 5; 4 overlaps 5 and 6: matched to the closer one, 6.
    assert outcome.tolist() == [near_duplicates.NEAR_DUPLICATE, near_duplicates.EVAL_OVERLAP,
                                near_duplicates.EVAL_OVERLAP]
    assert matched.tolist() == [0, 5, 6] and distance.tolist() == [2, 4, 1]


def signature_of(data):
    return near_duplicates.signature(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_details_confirm_variants_and_tell_apart_images_of_the_same_layout_in_other_colours():
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (3, 3))
    image = original(rng, palette)
    base = signature_of(jpeg(image, 90))
    for kind in ("reencode", "resize", "text"):
        changed = signature_of(jpeg(variant(image, kind, rng)[0], 90))
        assert near_duplicates.confirmed(*_rows(base, changed))[0], kind
    recoloured = image.copy()
    pixels = np.asarray(recoloured).copy()
    pixels[40:120, 40:120] = 255 - pixels[40:120, 40:120]  # one region in other colours, same grey layout
    other = signature_of(jpeg(Image.fromarray(pixels), 90))
    assert not near_duplicates.confirmed(*_rows(base, other))[0]


def _rows(*signatures):
    return [np.frombuffer(details, np.uint8)[None] for _, details in signatures]


def test_make_shards_finds_near_duplicates_with_the_precision_and_recall_it_promises(tmp_path):
    """The quality set of tools/bench/near_duplicates.py, smaller: recall >= 0.95 on re-encoded and resized
    copies, precision >= 0.99; `make bench-dedup` measures it on more images and reports every kind."""
    truth = write_raw(tmp_path / "raw", quality_set(30, seed=5), per_shard=100)
    result = shards.build(tmp_path / "raw", tmp_path / "train", samples_per_shard=100, processes=2)
    rejected = manifest.read_rejected(tmp_path / "train" / manifest.REJECTED)
    recall, precision, dropped = scores(rejected, truth)
    assert recall["reencode"] >= 0.95 and recall["resize"] >= 0.95 and precision >= 0.99 and dropped >= 60
    near = next(row for row in rejected if row["reason"] == "near_duplicate")
    assert truth[near["matches"]][1] == "original" and "perceptual hashes" in near["detail"]
    assert result["rules"]["near_duplicate_bits"] == 8 and "256-bit pHash" in result["rules"]["near_duplicates"]
    counts = result["reconciliation"]
    assert counts["shards_balanced"] and counts["rejected"]["near_duplicate"] == sum(
        row["reason"] == "near_duplicate" for row in rejected)
    assert "near_duplicate" in (tmp_path / "train" / manifest.REPORT).read_text()


def test_the_first_in_key_order_is_kept_and_minus_one_keeps_near_duplicates(tmp_path):
    rng = np.random.default_rng(7)
    image = original(rng, rng.integers(0, 256, (3, 3)))
    smaller = image.resize((image.width // 2, image.height // 2))
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(smaller, 90), "the small copy"), (jpeg(image, 90), "the large one")])
    shards.build(tmp_path / "raw", tmp_path / "train", processes=1)
    kept = [s["txt"].decode() for s in shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar")))]
    assert kept == ["the small copy"]
    result = shards.build(tmp_path / "raw", tmp_path / "train", processes=1,
                          duplicates=shards.DuplicateRules(near_duplicate_bits=-1))
    assert result["totals"]["samples"] == 2 and result["rules"]["near_duplicates"] == "kept"
    records = [json.loads(line) for line in (tmp_path / "train" / shards.WORK_DIR / "00000.jsonl").open()]
    assert all("phash" not in record for record in records)  # nothing reads hashes: none computed
    assert shards.verify(tmp_path / "train") == []


def evaluation_folder(root, training_images, rng):
    """Evaluation images: a re-encoded and resized copy of training image 0 in a nested folder, a PNG of image 1,
    a webdataset shard holding image 2, unrelated images, and one file that is not an image at all."""
    (root / "val" / "n01").mkdir(parents=True)
    copy = training_images[0].resize((training_images[0].width * 3 // 4, training_images[0].height * 3 // 4))
    (root / "val" / "n01" / "copy.JPEG").write_bytes(jpeg(copy, 60))
    training_images[1].save(root / "val" / "as_png.png")
    for number in range(3):
        (root / "val" / "n01" / f"other{number}.jpg").write_bytes(jpeg(original(rng, rng.integers(0, 256, (3, 3))), 90))
    (root / "val" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "val" / "labels.txt").write_text("n01 something\n")
    (root / "pairs").mkdir()
    shard_io.write_tar(root / "pairs" / "000000.tar", [{"__key__": "pair0", "jpg": jpeg(training_images[2], 90),
                                                       "txt": b"a caption"}])


def test_exclude_drops_training_samples_that_look_like_evaluation_images(tmp_path, capsys):
    rng = np.random.default_rng(11)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(8)]
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), f"training picture {number}")
                                          for number, image in enumerate(images)])
    evaluation_folder(tmp_path / "eval", images, rng)
    exclude = (str(tmp_path / "eval" / "val"), str(tmp_path / "eval" / "pairs"))
    result = shards.build(tmp_path / "raw", tmp_path / "train", processes=2,
                          duplicates=shards.DuplicateRules(exclude=exclude))
    kept = [s["txt"].decode() for s in shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar")))]
    assert kept == [f"training picture {number}" for number in range(3, 8)]
    overlaps = {row["key"]: row for row in manifest.read_rejected(tmp_path / "train" / manifest.REJECTED)
                if row["reason"] == "eval_overlap"}
    assert {key: (row["eval_set"], row["matches"]) for key, row in overlaps.items()} == {
        "000000000": (exclude[0], "n01/copy.JPEG"), "000000001": (exclude[0], "as_png.png"),
        "000000002": (exclude[1], "000000.tar/pair0.jpg")}
    sets = {entry["path"]: entry for entry in result["exclude"]}
    assert (sets[exclude[0]]["images"], sets[exclude[0]]["unreadable"], sets[exclude[0]]["overlapping_samples"]) == \
        (5, 1, 2)
    assert (sets[exclude[1]]["images"], sets[exclude[1]]["overlapping_samples"]) == (1, 1)
    assert result["reconciliation"]["rejected"] == {"eval_overlap": 3} and result["reconciliation"]["shards_balanced"]
    report = (tmp_path / "train" / manifest.REPORT).read_text()
    assert f"`{exclude[0]}`: 5 images (1 could not be read), 2 training samples dropped" in report
    assert "broken.jpg" in capsys.readouterr().out  # the image that could not be checked is named


def test_changing_exclude_rewrites_the_shards_it_changes(tmp_path):
    rng = np.random.default_rng(12)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(6)]
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), f"training picture {number}")
                                          for number, image in enumerate(images)])
    evaluation_folder(tmp_path / "eval", images, rng)
    train = tmp_path / "train"
    shards.build(tmp_path / "raw", train, samples_per_shard=3, processes=1)
    assert len(list(shard_io.read_samples(sorted(train.glob("*.tar"))))) == 6
    shards.build(tmp_path / "raw", train, samples_per_shard=3, processes=1,
                 duplicates=shards.DuplicateRules(exclude=(str(tmp_path / "eval"),)))
    kept = [s["__key__"] for s in shard_io.read_samples(sorted(train.glob("*.tar")))]
    assert kept == ["000000003", "000000004", "000000005"] and shards.verify(train) == []


def not_a_tar(root):
    (root / "eval").mkdir()
    (root / "eval" / "000000.tar").write_bytes(b"this is not a tar file " * 40)
    return root / "eval"


@pytest.mark.parametrize("make_path, message", [
    (lambda root: root / "missing", "EXCLUDE path '{path}' does not exist"),
    (lambda root: (root / "notes").mkdir() or root / "notes", "EXCLUDE path '{path}' holds no images"),
    (not_a_tar, "EXCLUDE file '{path}/000000.tar' is not a readable tar shard .ReadError: .*Replace it"),
], ids=["missing", "no_images", "not_a_tar"])
def test_an_unusable_exclude_path_is_a_clear_error(tmp_path, make_path, message):
    write_raw_shard(tmp_path / "raw", 0, [(jpeg_bytes(100, 80), "a picture")])
    path = make_path(tmp_path)
    with pytest.raises(SystemExit, match=message.format(path=path)):
        shards.build(tmp_path / "raw", tmp_path / "train", processes=1,
                     duplicates=shards.DuplicateRules(exclude=(str(path),)))
    assert not list((tmp_path / "train" / shards.WORK_DIR).glob("*.jsonl"))  # refused before pass 1


def test_an_exclude_path_holding_a_colon_is_given_escaped(tmp_path):
    rng = np.random.default_rng(15)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(3)]
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), f"picture {n}") for n, image in enumerate(images)])
    (tmp_path / "eval:2024").mkdir()
    (tmp_path / "eval:2024" / "copy.jpg").write_bytes(jpeg(images[1], 80))
    command = ["build", str(tmp_path / "raw"), str(tmp_path / "train"), "--processes", "1", "--exclude"]
    with pytest.raises(SystemExit, match=r"EXCLUDE path '.*/eval' does not exist, but '.*/eval:2024' does: .* "
                                         r"write a ':' inside a path as '\\:' \(EXCLUDE='.*/eval\\:2024'\)"):
        shards.main([*command, str(tmp_path / "eval:2024")])
    shards.main([*command, f"{tmp_path / 'eval'}\\:2024"])
    result = json.loads((tmp_path / "train" / manifest.MANIFEST).read_text())
    assert [(entry["path"], entry["overlapping_samples"]) for entry in result["exclude"]] == [
        (str(tmp_path / "eval:2024"), 1)]


def test_the_command_line_takes_exclude_paths_and_refuses_thresholds_out_of_range(tmp_path):
    rng = np.random.default_rng(13)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(4)]
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), f"picture {n}") for n, image in enumerate(images)])
    evaluation_folder(tmp_path / "eval", images, rng)
    exclude = f"{tmp_path / 'eval' / 'val'}:{tmp_path / 'eval' / 'pairs'}"
    shards.main(["build", str(tmp_path / "raw"), str(tmp_path / "train"), "--processes", "1",
                 "--exclude", exclude, "--eval-overlap-bits", "6"])
    result = json.loads((tmp_path / "train" / manifest.MANIFEST).read_text())
    assert [entry["overlapping_samples"] for entry in result["exclude"]] == [2, 1]
    assert result["rules"]["eval_overlap_bits"] == 6
    for option, value in itertools.product(("--near-duplicate-bits", "--eval-overlap-bits"), ("-2", "11")):
        with pytest.raises(SystemExit, match="must be -1 .off. to 10"):
            shards.main(["build", str(tmp_path / "raw"), str(tmp_path / "train"), option, value])


def test_exclude_works_with_near_duplicates_kept(tmp_path):
    rng = np.random.default_rng(14)
    images = [original(rng, rng.integers(0, 256, (3, 3))) for _ in range(5)]
    images.append(images[4].resize((images[4].width // 2, images[4].height // 2)))  # a near duplicate of image 4
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), f"picture {number}")
                                          for number, image in enumerate(images)])
    evaluation_folder(tmp_path / "eval", images, rng)
    result = shards.build(tmp_path / "raw", tmp_path / "train", processes=1, duplicates=shards.DuplicateRules(
        near_duplicate_bits=-1, exclude=(str(tmp_path / "eval"),)))
    kept = [s["txt"].decode() for s in shard_io.read_samples(sorted((tmp_path / "train").glob("*.tar")))]
    assert kept == ["picture 3", "picture 4", "picture 5"]
    assert result["reconciliation"]["rejected"] == {"eval_overlap": 3}


def test_exclude_catches_an_evaluation_image_resized_and_saved_at_low_jpeg_quality(tmp_path):
    """Resized to 0.7-1x and saved at JPEG quality 30-60 (bench-dedup's eval_edit): this copy's 256-bit pHash is 48
    bits from the training image's, past the 40 allowed between training images; against EXCLUDE 56 are."""
    rng = np.random.default_rng(147)
    image = original(rng, rng.integers(0, 256, (3, 3)))
    copy, quality = variant(image, "eval_edit", rng)
    write_raw_shard(tmp_path / "raw", 0, [(jpeg(image, 90), "the training image"), (jpeg_bytes(100, 80), "another")])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "copy.jpg").write_bytes(jpeg(copy, quality))
    command = ["build", str(tmp_path / "raw"), str(tmp_path / "train"), "--processes", "1", "--exclude",
               str(tmp_path / "eval")]
    shards.main(command)
    result = json.loads((tmp_path / "train" / manifest.MANIFEST).read_text())
    assert result["reconciliation"]["rejected"] == {"eval_overlap": 1}
    assert result["rules"]["eval_overlap_fine_bits"] == 56 and "within 56 bits" in result["rules"]["eval_overlap"]
    shards.main([*command, "--eval-overlap-fine-bits", "40"])  # the tolerance shared with near duplicates: it leaks
    assert json.loads((tmp_path / "train" / manifest.MANIFEST).read_text())["reconciliation"]["rejected"] == {}
    with pytest.raises(SystemExit, match=r"--eval-overlap-fine-bits must be 0 to 256 \(got 257\)"):
        shards.main([*command, "--eval-overlap-fine-bits", "257"])
