"""Image-text retrieval on held-out shards: recall@1/5/10 in both directions, with a run's EMA teachers.

    python -m tools.eval.retrieval --run runs/demo --shards shards/demo/source/heldout_pairs

The shards are WebDataset tars (.tar or .tar.zst) with a `jpg` and a `txt` per sample (in a local folder, or an
s3://, gs:// or hf:// one, copied to a temporary folder first): a folder built
by `make download` + `make shards` from a validation url list, or the demo's held-out pairs. Each image
has one caption, so image i's right answer is caption i and the other way round. Scores are cosine
similarities of the L2-normalized CLIP embeddings (as the official ProtoCLIP-based script).
"""

import argparse
import io
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from datapipe import shard_io
from datapipe.object_store import is_remote
from datapipe.publish import stage
from datapipe.text import clean_caption, tokenize
from tools.eval.towers import RunTowers, text_embeddings

RECALL_AT = (1, 5, 10)


def read_pairs(shards_dir):
    """(keys, PIL images, captions) from every shard in the folder (an s3://, gs:// or hf:// one is copied to a
    temporary folder first)."""
    if is_remote(shards_dir):
        with tempfile.TemporaryDirectory(prefix="retrieval-") as local_dir:
            stage(shards_dir, local_dir)
            return read_pairs(local_dir)
    shards = sorted(path for path in Path(shards_dir).glob("*") if path.name.endswith((".tar", ".tar.zst")))
    if not shards:
        raise FileNotFoundError(f"{shards_dir}: no .tar or .tar.zst shards; build held-out shards with "
                                "`make download` + `make shards` on a validation url list")
    keys, images, captions = [], [], []
    for sample in shard_io.read_samples(shards):
        where = f"{sample['__url__']}: sample {sample['__key__']}"
        if "jpg" not in sample or "txt" not in sample:
            raise ValueError(f"{where} has no jpg or no txt member; retrieval needs both")
        try:
            image = Image.open(io.BytesIO(sample["jpg"]))
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{where}: the image does not decode ({error}); run `make verify` on the shards") \
                from None
        keys.append(sample["__key__"])
        images.append(image)
        captions.append(clean_caption(sample["txt"].decode("utf-8", errors="replace")))
    return keys, images, captions


def recall_at(similarity, ks=RECALL_AT):
    """similarity: (n, n) with the right answer of row i at column i -> {k: fraction of rows ranking it in top k}."""
    right = similarity.diagonal()[:, None]
    rank = (similarity > right).sum(dim=1)  # how many candidates score above the right one
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def retrieval(towers, shards_dir):
    """Recall@k both ways of `towers` (a RunTowers) on held-out pairs."""
    keys, images, captions = read_pairs(shards_dir)
    image = towers.image_features(images, desc="retrieval")["embedding"]
    text = text_embeddings(towers.text, torch.from_numpy(tokenize(captions)).long(), device=towers.device)
    similarity = image @ text.T  # (images, captions)
    image_to_text, text_to_image = recall_at(similarity), recall_at(similarity.T)
    result = {"shards": str(shards_dir), "run": str(towers.run_dir), "pairs": len(keys)}
    for k in RECALL_AT:
        result[f"image_to_text_R@{k}"] = round(image_to_text[k], 4)
        result[f"text_to_image_R@{k}"] = round(text_to_image[k], 4)
        result[f"chance_R@{k}"] = round(min(k / len(keys), 1.0), 4)
    recalls = [*image_to_text.values(), *text_to_image.values()]
    result["mean_recall"] = round(sum(recalls) / len(recalls), 4)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--shards", required=True, help="a folder of held-out .tar/.tar.zst shards (jpg + txt)")
    parser.add_argument("--out", help="JSON result (default: <run>/eval_retrieval.json)")
    args = parser.parse_args(argv)
    try:
        result = retrieval(RunTowers(args.run), args.shards)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    out = Path(args.out or Path(args.run) / "eval_retrieval.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"retrieval on {result['pairs']} held-out pairs: image->text R@1/5/10 "
          + "/".join(f"{100 * result[f'image_to_text_R@{k}']:.1f}" for k in RECALL_AT) + ", text->image "
          + "/".join(f"{100 * result[f'text_to_image_R@{k}']:.1f}" for k in RECALL_AT)
          + f" % (chance R@1 {100 * result['chance_R@1']:.1f}%); written to {out}")


if __name__ == "__main__":
    main()
