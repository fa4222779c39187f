"""`make shards`: validate, clean, filter, de-duplicate and re-shard downloaded data.

    python -m datapipe.shards build shards/demo/raw shards/demo/train
    python -m datapipe.shards verify shards/demo/train

Three passes. (1) In parallel, one raw shard per task: decode every image, normalize it to an
RGB JPEG, clean and tokenize its caption, or reject it with a reason; the cleaned samples go to
<out>/_work/<raw>.tar (captions, tokens, info, and only the images that had to be converted: an
RGB JPEG is read again from the raw tar when its shard is written) and one record per sample
(sorted by key) to <out>/_work/<raw>.jsonl.
(2) Drop exact duplicate images (same decoded pixels), then images within `eval_overlap_bits` of an
evaluation image (EXCLUDE), then near duplicates (perceptual hashes within `near_duplicate_bits`),
keeping the first in key order (datapipe/common/near_duplicates.py), and plan fixed-size output shards.
(3) In parallel, write each training shard and its DALI index; a work tar is deleted as soon as
every shard that reads it is written. Then manifest.json, rejected.jsonl.zst
and report.md.

Never stale: each raw shard's work records what it was made from (the raw tar's sha256 and the
rules); work made from other bytes or rules is redone, and a training shard is rewritten unless
it was made from the same work, keys and settings. Files the new manifest does not list (shards of
an earlier build with another SAMPLES_PER_SHARD, work of raw shards that are gone) are removed.
While anything is rewritten there is no manifest.json, so nothing half-built looks complete.

Bounded: disk holds raw/, the training shards and the small work tars (converted images and text)
at any time, and only the per-sample records remain in _work/ afterwards; memory holds one 40-byte entry per sample
for de-duplication, never the records themselves. One build at a time per output folder (a lock).

Where each step lives, in the order data flows (datapipe/shards/): inputs.py (what a build is given, checked
first), work.py (pass 1's records per raw shard), clean.py (pass 1), duplicates.py, screen.py (EXCLUDE and near
duplicates) and plan.py (pass 2), write.py (pass 3), results.py (manifest, rejection log, report), pipeline.py
(the whole build, in order), verification.py (`make verify`), cli.py (the command line). On Spark (--distributor
pyspark, docs/spark.md): spark_pipeline.py (the same passes, the same result), spark_screen.py (exact and near
duplicates as DataFrame joins), spark_session.py (the requirements, the session, functions as Spark tasks).
"""

from datapipe.common.validate import ImageRules
from datapipe.shards.cli import main
from datapipe.shards.inputs import BuildError
from datapipe.shards.pipeline import build
from datapipe.shards.screen import DuplicateRules
from datapipe.shards.verification import verify
from datapipe.shards.work import WORK_DIR

__all__ = ["WORK_DIR", "BuildError", "DuplicateRules", "ImageRules", "build", "main", "verify"]
