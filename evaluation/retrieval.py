"""Image-text retrieval: recall@1/5/10 in both directions, with a run's EMA teachers.

    python -m evaluation.retrieval --run runs/harmony_demo --data shards/demo/source/heldout_pairs
    python -m evaluation.retrieval --run runs/harmony_cc3m --data /data/coco/dataset_coco.json --images /data/coco
    python -m evaluation.retrieval --run runs/harmony_cc3m --data /data/clip_benchmark/wds_flickr30k

The data is a retrieval set in any layout evaluation.datasets reads: held-out shards (one jpg + txt each),
a CLIP_benchmark retrieval set, or a Karpathy-split JSON (COCO 5k / Flickr30k 1k test images, about 5
captions each) with its image folder. Scores are cosine similarities of the L2-normalized CLIP embeddings.
image->text: an image is a hit at k when any of its captions is among the k best captions; text->image: a
caption is a hit when its image is among the k best images (as the papers and CLIP_benchmark report).
Ties are ranked as CLIP_benchmark ranks them: candidates with equal scores in index order, so a right
answer tied with wrong ones is a hit only where it comes first among them.
"""

import argparse
import json
from pathlib import Path

import torch

from datapipe.common.captions import tokenize
from evaluation.datasets import LayoutError, open_eval_set
from evaluation.towers import RunTowers, text_embeddings, undecodable_note

RECALL_AT = (1, 5, 10)


def first_right_rank(similarity, positive):
    """similarity: (queries, candidates); positive: (queries, candidates) bool, True at each right answer ->
    (queries,) how many candidates precede each query's first right answer, ordered by score, ties by index."""
    best = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (q, 1) best right score
    # The first right answer in (score descending, index ascending) order, and how many candidates precede it.
    first = (positive & (similarity == best)).int().argmax(dim=1, keepdim=True)  # (q, 1)
    earlier = torch.arange(similarity.shape[1])[None, :] < first  # (q, c)
    return (similarity > best).sum(dim=1) + ((similarity == best) & earlier).sum(dim=1)  # (q,)


def recalls(rank, ks=RECALL_AT):
    """{k: fraction of queries with a right answer in their top k} of first_right_rank's (queries,) ranks."""
    return {k: float((rank < k).float().mean()) for k in ks}


def recall_at(similarity, positive, ks=RECALL_AT):
    """recalls() of first_right_rank's arguments."""
    return recalls(first_right_rank(similarity, positive), ks)


@torch.no_grad()
def retrieval(towers, data, images_dir=None):
    """Recall@k both ways of `towers` (a RunTowers) on a retrieval set (an EvalSet or a path)."""
    eval_set = data if not isinstance(data, str | Path) else open_eval_set(data, images=images_dir)
    if eval_set.kind != "retrieval":
        raise LayoutError(f"{eval_set.source}: a {eval_set.layout} set is for classification, not retrieval")
    features, captions_per_image = towers.encode(eval_set)
    captions = [caption for captions in captions_per_image for caption in captions]
    caption_image = torch.tensor([image for image, captions in enumerate(captions_per_image) for _ in captions])
    text = text_embeddings(towers.text, torch.from_numpy(tokenize(captions)).long(), device=towers.device)
    similarity = features["embedding"] @ text.T  # (images, captions)
    positive = caption_image[None, :] == torch.arange(len(captions_per_image))[:, None]  # (images, captions)
    ranks = {"image_to_text": first_right_rank(similarity, positive),  # (images,)
             "text_to_image": first_right_rank(similarity.T, positive.T)}  # (captions,)
    image_to_text, text_to_image = recalls(ranks["image_to_text"]), recalls(ranks["text_to_image"])
    images = len(captions_per_image)
    result = {**eval_set.describe(), "run": str(towers.run_dir),
              "images": images, "captions": len(captions), "pairs": len(captions),
              "ties": "ranked by index, as CLIP_benchmark", "undecodable": towers.undecodable(eval_set)}
    for k in RECALL_AT:
        result[f"image_to_text_R@{k}"] = round(image_to_text[k], 4)
        result[f"text_to_image_R@{k}"] = round(text_to_image[k], 4)
        result[f"chance_R@{k}"] = round(min(k / images, 1.0), 4)
    every_recall = [*image_to_text.values(), *text_to_image.values()]
    result["mean_recall"] = round(sum(every_recall) / len(every_recall), 4)
    # Per query in the set's order, for paired comparisons: how many candidates rank above its first right answer
    # (a hit at k when below k); captions are the queries of text_to_image, listed image by image.
    result["per_query_rank"] = {direction: rank.tolist() for direction, rank in ranks.items()}
    result["captions_per_image"] = [len(captions) for captions in captions_per_image]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--data", required=True, help="a retrieval set (see evaluation.datasets)")
    parser.add_argument("--images", help="the image folder of a Karpathy-split JSON (default: the JSON's folder)")
    parser.add_argument("--out", help="JSON result (default: <run>/eval_retrieval.json)")
    args = parser.parse_args(argv)
    try:
        result = retrieval(RunTowers(args.run), args.data, args.images)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out or Path(args.run) / "eval_retrieval.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"retrieval on {result['images']} images and {result['captions']} captions: image->text R@1/5/10 "
          + "/".join(f"{100 * result[f'image_to_text_R@{k}']:.1f}" for k in RECALL_AT) + ", text->image "
          + "/".join(f"{100 * result[f'text_to_image_R@{k}']:.1f}" for k in RECALL_AT)
          + f" % (chance R@1 {100 * result['chance_R@1']:.1f}%; ties ranked by index); written to {out}")
    for entry in result["undecodable"]:
        print(undecodable_note(entry))


if __name__ == "__main__":
    main()
