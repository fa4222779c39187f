"""Pass 2, second step: the exact-duplicate survivors screened against the evaluation images (EXCLUDE,
datapipe/shards/exclusions.py) and against each other (near duplicates, datapipe/common/near_duplicates.py)."""

import dataclasses
from pathlib import Path

import numpy as np

from datapipe.common import near_duplicates
from datapipe.shards.work import accepted_records

MAX_HASH_BITS_APART = 10
EVAL_OVERLAP_FINE_BITS = 56  # of 256: see DuplicateRules.eval_overlap_fine_bits
# Hash-table entries (tables x hashes) from which the table search runs in the process pool: below it, the search
# takes milliseconds here, while each pool worker it would start takes seconds to import the pipeline.
PARALLEL_TABLE_ENTRIES = 1_000_000


@dataclasses.dataclass(frozen=True)
class DuplicateRules:
    """Pass 2's screening beyond exact duplicates; every one is a command-line option."""

    near_duplicate_bits: int = 8  # pHash bits apart that still count as the same picture; -1 keeps near duplicates
    eval_overlap_bits: int = 8  # the same, against the EXCLUDE images
    exclude: tuple[str, ...] = ()  # folders, images or .tar shards of evaluation images
    # The confirming 256-bit pHash's tolerance against EXCLUDE images: looser than between training images
    # (near_duplicates.FINE_BITS_APART), since a leaked evaluation image costs more than a training image dropped.
    # make bench-dedup measures recall and precision for each value (BENCHMARKS.md).
    eval_overlap_fine_bits: int = EVAL_OVERLAP_FINE_BITS

    def __post_init__(self):
        # Unrelated photos are rarely under 12 bits apart; the exact search's tables multiply with the bits (for
        # 12M images: 84 at 6 bits, 495 at 8, 3003 at 10).
        limit = MAX_HASH_BITS_APART
        if not (-1 <= self.near_duplicate_bits <= limit and 0 <= self.eval_overlap_bits <= limit):
            raise ValueError(f"--near-duplicate-bits must be -1 (off) to {MAX_HASH_BITS_APART} and "
                             f"--eval-overlap-bits 0 to {MAX_HASH_BITS_APART} (got {self.near_duplicate_bits} and "
                             f"{self.eval_overlap_bits})")
        if not 0 <= self.eval_overlap_fine_bits <= near_duplicates.FINE_HASH_SIDE ** 2:
            raise ValueError(f"--eval-overlap-fine-bits must be 0 to {near_duplicates.FINE_HASH_SIDE ** 2} (got "
                             f"{self.eval_overlap_fine_bits})")

    @property
    def hashing(self):
        """Whether pass 1 computes perceptual hashes (off only when nothing reads them)."""
        return self.near_duplicate_bits >= 0 or bool(self.exclude)

    def describe(self):
        def confirmation(fine_bits):
            return (f"confirmed by a 256-bit pHash within {fine_bits} bits and colour layout within "
                    f"{near_duplicates.COLOUR_TOLERANCE}")
        near = (f"perceptual hash (64-bit pHash) within {self.near_duplicate_bits} bits "
                f"{confirmation(near_duplicates.FINE_BITS_APART)} of an earlier kept sample; the first in key order "
                "is kept") if self.near_duplicate_bits >= 0 else "kept"
        overlap = (f"perceptual hash within {self.eval_overlap_bits} bits {confirmation(self.eval_overlap_fine_bits)} "
                   f"of an image in {list(self.exclude)}" if self.exclude else "no EXCLUDE given")
        return {"near_duplicates": near, "eval_overlap": overlap}


@dataclasses.dataclass(frozen=True)
class Screened:
    """Candidates dropped after the exact duplicates: as eval_overlap or near_duplicate (sorted by index)."""

    index: np.ndarray  # candidate indices
    outcome: np.ndarray  # near_duplicates.EVAL_OVERLAP or NEAR_DUPLICATE
    matched: np.ndarray  # the candidate it looks like, or the evaluation image (index into `references`)
    distance: np.ndarray  # perceptual hash bits apart
    references: list  # (EXCLUDE path, image name) of each evaluation image

    @classmethod
    def nothing(cls):
        return cls(*(np.empty(0, dtype=np.int64) for _ in range(4)), [])


def screen_near_duplicates(pool, work_dir, records_paths, counts, hashes, candidates, exclusion_sets, duplicates):
    """Screen the exact-duplicate survivors `candidates` (sorted indices) against the evaluation images and each
    other (datapipe/common/near_duplicates.py); returns a Screened with candidate indices."""
    if not (duplicates.near_duplicate_bits >= 0 or exclusion_sets) or not len(candidates):
        return Screened.nothing()
    count = len(candidates)
    combined = np.concatenate([hashes[candidates], *(excluded.hashes for excluded in exclusion_sets)])
    threshold = max(duplicates.near_duplicate_bits, duplicates.eval_overlap_bits if exclusion_sets else -1)
    tables = len(near_duplicates.table_masks(threshold, len(combined)))
    parallel = pool if tables * len(combined) >= PARALLEL_TABLE_ENTRIES else None
    first, second, distances = near_duplicates.near_pairs(combined, threshold, count, parallel,
                                                          Path(work_dir) / "perceptual_hashes.npy")
    to_reference = second >= count
    close = np.where(to_reference, distances <= duplicates.eval_overlap_bits,
                     distances <= duplicates.near_duplicate_bits)
    first, second, distances = first[close], second[close], distances[close]
    # Each pair confirmed by the details of its images, read for these images only (the candidates' from records).
    involved = np.unique(np.concatenate([first, second[second < count]]))
    details = np.zeros((len(involved) + len(combined) - count, near_duplicates.DETAIL_BYTES), dtype=np.uint8)
    for _, index, record in accepted_records(records_paths, counts, candidates[involved]):
        details[np.searchsorted(involved, np.searchsorted(candidates, index))] = np.frombuffer(
            bytes.fromhex(record["details"]), dtype=np.uint8)
    if exclusion_sets:
        details[len(involved):] = np.concatenate([excluded.details for excluded in exclusion_sets])

    def row(indices):  # a combined index -> its row of `details`
        return np.where(indices < count, np.searchsorted(involved, indices), indices - count + len(involved))

    same = near_duplicates.confirmed(details[row(first)], details[row(second)], np.where(
        second >= count, duplicates.eval_overlap_fine_bits, near_duplicates.FINE_BITS_APART))
    index, outcome, matched, distance = near_duplicates.screen(first[same], second[same], distances[same], count)
    matched = np.where(outcome == near_duplicates.NEAR_DUPLICATE, candidates[np.clip(matched, 0, count - 1)],
                       matched - count)
    references = [(excluded.path, name) for excluded in exclusion_sets for name in excluded.names]
    return Screened(candidates[index], outcome, matched, distance, references)
