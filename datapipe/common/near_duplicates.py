"""Near-duplicate images: a 64-bit perceptual hash per image to find candidate pairs without comparing all
pairs, and a finer signature to confirm each one.

The hash is a pHash (Krawetz's "Looks like it"): a 64 x 64 grey copy of the image, its 2-D DCT, and one bit per
coefficient of the 8 x 8 lowest frequencies: above their median or not. It stays put under re-encoding, resizing,
brightness changes and small overlays, and moves under crops (measured in tests/test_near_duplicates.py and
BENCHMARKS.md). At 64 bits it only sees the coarse layout: a red circle and a blue cross at the same place on
the same background look alike. So each pair it finds is confirmed by the image's `details`: the same test on the
16 x 16 lowest frequencies (256 bits; at most FINE_BITS_APART apart) and a colour layout (the chromaticity, r
and g over r + g + b so that brightness cancels, of a 4 x 4 grid; at most COLOUR_TOLERANCE apart on average and
CELL_COLOUR_TOLERANCE in any cell). The image is first shrunk by a whole factor (Pillow's box `reduce`) to at
least 64 px a side, and both hashes come from one DCT (two 64 x 64 matrix products), so a signature costs a
fraction of decoding the image at any size. (imagehash's phash computes the same kind of hash but resizes and
transforms once per hash size, through scipy: 4x the time here.)

The search is exact and bounded (Manku, Jain and Das Sarma, WWW 2007): the 64 bits are cut into m = t + a
blocks, so two hashes at most t bits apart agree on at least a whole blocks. For each of the C(m, a) choices of
a blocks ("tables") the hashes are sorted by those bits and only hashes agreeing there are compared. `a` grows
with the number of hashes so that a table's key has about log2(n) - 3 bits and its buckets hold a few hashes:
the work is C(m, a) sorts plus the pairs inside buckets, never n^2 / 2. Tables run in parallel. The details are
read for the pairs found only.
"""

import itertools
import math
from pathlib import Path

import numpy as np
from PIL import Image

HASH_BITS = 64
HASH_SIDE = 8  # 8 x 8 = 64 bits
GREY_SIDE_PX = 64  # the grey copy the DCT transforms; images are box-reduced to at least this first
BUCKET_BITS_BELOW_LOG2_N = 3  # a table key of log2(n) - 3 bits: about 8 hashes per bucket
FINE_HASH_SIDE = 16  # the confirming hash: 16 x 16 = 256 bits
FINE_BITS_APART = 40  # re-encoding and resizing stay under 26 of 256 bits (99%), another shape moves it 36+
LAYOUT_GRID = 4
COLOUR_TOLERANCE = 0.015  # mean |chromaticity difference| over the grid: re-encoding and resizing stay under
#                           0.009, brightness changes under 0.015 (99%), a 10% crop under 0.05
CELL_COLOUR_TOLERANCE = 0.06  # and in every cell: an object of another colour moves its cell more
DETAIL_BYTES = FINE_HASH_SIDE ** 2 // 8 + LAYOUT_GRID ** 2 * 2  # 32 + 32
# DCT-II basis: row k holds cos(pi * k * (2n + 1) / 2N) over the N = 64 samples n.
_DCT = np.cos(np.pi * np.arange(GREY_SIDE_PX)[:, None] * (2 * np.arange(GREY_SIDE_PX)[None, :] + 1)
              / (2 * GREY_SIDE_PX))


def _bits_above_median(coefficients):
    return np.packbits((coefficients > np.median(coefficients)).flatten()).tobytes()


def signature(rgb):
    """(64-bit pHash as an int, details: 64 bytes, the 256-bit pHash then the colour layout) of a PIL RGB image."""
    factor = min(rgb.size) // GREY_SIDE_PX
    small = rgb.reduce(factor) if factor > 1 else rgb
    grey = np.asarray(small.convert("L").resize((GREY_SIDE_PX, GREY_SIDE_PX), Image.Resampling.LANCZOS),
                      dtype=np.float64)
    frequencies = _DCT[:FINE_HASH_SIDE] @ grey @ _DCT[:FINE_HASH_SIDE].T  # (16, 16): the lowest only
    cells = np.asarray(small.resize((LAYOUT_GRID, LAYOUT_GRID), Image.Resampling.BOX), dtype=np.float64)
    chromaticity = cells[..., :2] / (cells.sum(axis=-1, keepdims=True) + 1.0)  # (4, 4, 2) r and g shares
    details = _bits_above_median(frequencies) + np.rint(chromaticity * 255).astype(np.uint8).tobytes()
    return int.from_bytes(_bits_above_median(frequencies[:HASH_SIDE, :HASH_SIDE]), "big"), details


def confirmed(first, second, fine_bits_apart=FINE_BITS_APART):
    """Whether pairs of details ((k, 64) uint8 arrays) are the same picture: (k,) bool. `fine_bits_apart`: the
    256-bit pHash tolerance, one for all pairs or (k,) one per pair."""
    fine = FINE_HASH_SIDE ** 2 // 8
    bits_apart = np.unpackbits(first[:, :fine] ^ second[:, :fine], axis=1).sum(axis=1)
    colours = np.abs(first[:, fine:].astype(np.int16) - second[:, fine:].astype(np.int16)) / 255  # (k, 32)
    return ((bits_apart <= fine_bits_apart) & (colours.mean(axis=1) <= COLOUR_TOLERANCE)
            & (colours.max(axis=1) <= CELL_COLOUR_TOLERANCE))


def table_masks(threshold, count):
    """The bit masks of the tables that find every pair within `threshold` bits among `count` hashes."""
    wanted_bits = max(1.0, math.log2(max(count, 2)) - BUCKET_BITS_BELOW_LOG2_N)
    agreeing = 1
    while HASH_BITS * agreeing / (threshold + agreeing) < wanted_bits and agreeing + threshold < HASH_BITS:
        agreeing += 1
    edges = np.linspace(0, HASH_BITS, threshold + agreeing + 1).round().astype(int)
    blocks = [sum(1 << bit for bit in range(start, stop)) for start, stop in itertools.pairwise(edges)]
    return [np.uint64(sum(chosen)) for chosen in itertools.combinations(blocks, agreeing)]


def pairs_in_table(hashes, mask, threshold, first_reference):
    """(i, j, distance) of the pairs i < j within `threshold` bits among the hashes agreeing on `mask`; pairs of two
    reference hashes (index >= first_reference) are left out. hashes: (n,) uint64, or the path of a .npy of it."""
    if not isinstance(hashes, np.ndarray):
        hashes = np.load(hashes, mmap_mode="r")
    keys = hashes & mask
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_hashes = keys[order], hashes[order]
    found, offset = [], 1
    starts = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])  # positions whose next hash shares the key
    while len(starts):  # compare each hash with the one `offset` places on, while they share the key
        distances = np.bitwise_count(sorted_hashes[starts] ^ sorted_hashes[starts + offset])
        close = starts[distances <= threshold]
        left, right = order[close], order[close + offset]
        found.append((np.minimum(left, right), np.maximum(left, right), distances[distances <= threshold]))
        offset += 1
        starts = starts[starts + offset < len(sorted_keys)]
        starts = starts[sorted_keys[starts + offset] == sorted_keys[starts]]
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    first, second, distances = (np.concatenate(parts) for parts in zip(*found, strict=True))
    wanted = first < first_reference
    return first[wanted], second[wanted], distances[wanted].astype(np.uint8)


def near_pairs(hashes, threshold, first_reference, pool=None, hashes_path=None):
    """Every pair i < j of `hashes` ((n,) uint64) at most `threshold` bits apart, once: (i, j, distance) sorted by
    (j, i). Indices >= first_reference are reference images (evaluation sets), never paired with each other.
    With a process pool the tables run in parallel, reading the hashes saved at `hashes_path` (removed after)."""
    masks = table_masks(threshold, len(hashes))
    if pool is None:
        results = [pairs_in_table(hashes, mask, threshold, first_reference) for mask in masks]
    else:
        np.save(hashes_path, hashes)
        try:
            results = list(pool.map(pairs_in_table, itertools.repeat(str(hashes_path)), masks,
                                    itertools.repeat(threshold), itertools.repeat(first_reference)))
        finally:
            Path(hashes_path).unlink(missing_ok=True)
    first, second, distances = (np.concatenate(parts) for parts in zip(*results, strict=True))
    codes, unique = np.unique(second * len(hashes) + first, return_index=True)  # a pair found by several tables
    return codes % len(hashes), codes // len(hashes), distances[unique]


KEPT, EVAL_OVERLAP, NEAR_DUPLICATE = 0, 1, 2


def screen(first, second, distances, candidates):
    """Decide each of `candidates` images (key order) from their near pairs; indices >= candidates are reference
    images. A candidate within the threshold of a reference image is an eval_overlap (matched to the closest one);
    otherwise one within the threshold of an earlier candidate that was not itself dropped as a near duplicate is a
    near_duplicate of the first such candidate. So the first of each group in key order is kept, and images close
    to one that overlaps an evaluation set go too.
    Returns (dropped candidate indices, their outcome, the index each matched, the distance), sorted by index."""
    outcome = np.zeros(candidates, dtype=np.int8)
    matched = np.full(candidates, -1, dtype=np.int32)
    distance = np.zeros(candidates, dtype=np.uint8)
    reference = second >= candidates
    overlapping, references, bits = first[reference], second[reference], distances[reference]
    by_closeness = np.lexsort((references, bits, overlapping))  # per candidate: the closest, then the lowest index
    closest = by_closeness[np.unique(overlapping[by_closeness], return_index=True)[1]]
    outcome[overlapping[closest]] = EVAL_OVERLAP
    matched[overlapping[closest]], distance[overlapping[closest]] = references[closest], bits[closest]
    for earlier, later, bits in zip(first[~reference].tolist(), second[~reference].tolist(),
                                    distances[~reference].tolist(), strict=True):  # sorted by (later, earlier)
        if outcome[later] == KEPT and outcome[earlier] != NEAR_DUPLICATE:
            outcome[later], matched[later], distance[later] = NEAR_DUPLICATE, earlier, bits
    dropped = np.flatnonzero(outcome != KEPT)
    return dropped, outcome[dropped], matched[dropped], distance[dropped]
