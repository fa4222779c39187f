"""The headline metrics of an evaluation's results (evaluation.run.evaluate's dict): their values, chance levels
and per-example outcomes, under the same names for every method.

Per-example outcomes, for paired comparisons (comparison.statistics), are held per *unit*, the example that a
resampling draws: an image of a zero-shot or probe test set; an image of a retrieval set, with its captions (the
captions of one image are not independent queries). A metric is the mean over its components of
sum(sums) / sum(counts), each (units,):
- zero-shot, linear probe, k-NN top-1: one component, 1/0 per image over 1 per image;
- image→text R@1: 1/0 per image over 1; text→image R@1: per image, its captions that hit over its captions;
- retrieval mean recall: the six recalls (R@1/5/10 both ways) as six components.
"""

import numpy as np

from evaluation.linear_probe import reported_k
from evaluation.retrieval import RECALL_AT

ZERO_SHOT, IMAGE_TO_TEXT, TEXT_TO_IMAGE = "zero-shot top-1", "image→text R@1", "text→image R@1"
MEAN_RECALL, LINEAR_PROBE = "retrieval mean recall", "linear probe top-1"
MAIN_ORDER = (ZERO_SHOT, MEAN_RECALL, LINEAR_PROBE)  # the main metric: the first the results hold, else the first


def knn_name(k):
    return f"k-NN top-1 (k={k})"


def headline(results):
    """{metric: value} of one evaluation's results, the figures papers report (same keys for every method)."""
    metrics = {}
    if "zeroshot" in results:
        metrics[ZERO_SHOT] = results["zeroshot"]["top1"]
    if "retrieval" in results:
        metrics[IMAGE_TO_TEXT] = results["retrieval"]["image_to_text_R@1"]
        metrics[TEXT_TO_IMAGE] = results["retrieval"]["text_to_image_R@1"]
        metrics[MEAN_RECALL] = results["retrieval"]["mean_recall"]
    if "linear_probe" in results:
        metrics[LINEAR_PROBE] = results["linear_probe"]["linear"]["top1"]
        k = reported_k(results["linear_probe"]["knn_top1"])
        if k:
            metrics[knn_name(k)] = results["linear_probe"]["knn_top1"][k]
    return metrics


def main_metric(metrics):
    """The metric the report's differences lead with, of a list of metric names (None when empty)."""
    return next((metric for metric in MAIN_ORDER if metric in metrics), next(iter(metrics), None))


def chance_levels(results):
    """{metric: the score of guessing} where the results give it."""
    levels = {}
    if "zeroshot" in results:
        levels[ZERO_SHOT] = results["zeroshot"]["chance"]
    if "retrieval" in results:
        retrieval = results["retrieval"]
        levels[IMAGE_TO_TEXT] = levels[TEXT_TO_IMAGE] = retrieval["chance_R@1"]
        levels[MEAN_RECALL] = float(np.mean([retrieval[f"chance_R@{k}"] for k in RECALL_AT]))
    if "linear_probe" in results:
        levels[LINEAR_PROBE] = results["linear_probe"]["chance"]
        levels.update({knn_name(k): results["linear_probe"]["chance"] for k in results["linear_probe"]["knn_top1"]})
    return levels


def per_example_outcomes(results):
    """{metric: (sums, counts), each (components, units) int arrays} of the metrics whose per-example outcomes the
    results hold (evaluations made before they were recorded have none)."""
    outcomes = {}
    if "per_example_correct" in results.get("zeroshot", {}):
        outcomes[ZERO_SHOT] = _one_per_unit(results["zeroshot"]["per_example_correct"])
    if "per_query_rank" in results.get("retrieval", {}):
        outcomes.update(_retrieval_outcomes(results["retrieval"]))
    probe = results.get("linear_probe", {})
    if "per_example_correct" in probe.get("linear", {}):
        outcomes[LINEAR_PROBE] = _one_per_unit(probe["linear"]["per_example_correct"])
    for k, correct in probe.get("knn_per_example_correct", {}).items():
        outcomes[knn_name(k)] = _one_per_unit(correct)
    return outcomes


def _one_per_unit(correct):
    correct = np.asarray(correct, dtype=np.int64)[None, :]  # (1, units)
    return correct, np.ones_like(correct)


def _retrieval_outcomes(retrieval):
    captions = np.asarray(retrieval["captions_per_image"], dtype=np.int64)  # (images,)
    owner = np.repeat(np.arange(len(captions)), captions)  # (captions,) the image of each caption
    image_rank = np.asarray(retrieval["per_query_rank"]["image_to_text"])  # (images,)
    caption_rank = np.asarray(retrieval["per_query_rank"]["text_to_image"])  # (captions,)
    image_hits = np.stack([image_rank < k for k in RECALL_AT]).astype(np.int64)  # (ks, images)
    caption_hits = np.stack([np.bincount(owner, weights=caption_rank < k, minlength=len(captions))
                             for k in RECALL_AT]).astype(np.int64)  # (ks, images): hits among each image's captions
    ones, caption_counts = np.ones_like(image_hits), np.broadcast_to(captions, caption_hits.shape)
    return {IMAGE_TO_TEXT: (image_hits[:1], ones[:1]), TEXT_TO_IMAGE: (caption_hits[:1], caption_counts[:1]),
            MEAN_RECALL: (np.concatenate([image_hits, caption_hits]), np.concatenate([ones, caption_counts]))}
