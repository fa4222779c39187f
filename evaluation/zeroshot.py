"""Zero-shot classification with a run's EMA teachers (CLIP-style prompts).

    python -m evaluation.zeroshot --run runs/harmony_demo --data shards/demo/source/heldout
    python -m evaluation.zeroshot --run runs/harmony_cc3m --data /data/imagenet/val     # synset folders
    python -m evaluation.zeroshot --run runs/harmony_cc3m --data /data/imagenet/val_flat --labels val.txt
    python -m evaluation.zeroshot --run runs/harmony_cc3m --data /data/clip_benchmark/wds_cars

The data is a classification set in any layout evaluation.datasets reads. Each class's text embedding is
the normalized mean of its prompts' embeddings. Templates: the set's own (CLIP_benchmark), else open_clip's
80 OpenAI ImageNet templates for ImageNet and its 7-template ensemble ("simple") for class folders;
--templates openai|simple|FILE (one template a line, `{c}` for the class name) overrides. The result records
where the class names and templates came from.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from datapipe.common.captions import tokenize
from evaluation.datasets import TEMPLATE_SETS, LayoutError, open_eval_set
from evaluation.towers import RunTowers, text_embeddings, undecodable_note


def choose_templates(eval_set, choice=None):
    """(name, templates as "{}" strings): `choice` (a set's name or a file), else the set's own or its default."""
    if choice in TEMPLATE_SETS:
        return choice, TEMPLATE_SETS[choice]
    if choice:
        path = Path(choice)
        if not path.is_file():
            raise LayoutError(f"--templates {choice!r}: neither {' nor '.join(TEMPLATE_SETS)} nor a file")
        return str(path), tuple(line.strip().replace("{c}", "{}") for line in path.read_text().splitlines()
                                if line.strip())
    if eval_set.templates:
        return f"{eval_set.source}/zeroshot_classification_templates.txt", eval_set.templates
    return eval_set.default_templates, TEMPLATE_SETS[eval_set.default_templates]


@torch.no_grad()
def class_embeddings(text_tower, names, templates, device="cpu"):
    """(classes, clip_dim): per class, the normalized mean of its normalized prompt embeddings."""
    tokens = torch.from_numpy(tokenize([template.format(name) for name in names for template in templates])).long()
    prompts = text_embeddings(text_tower, tokens, device=device).unflatten(0, (len(names), len(templates)))
    return F.normalize(prompts.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot(towers, data, templates=None, label_file=None):
    """Top-1 (overall and per class) of `towers` (a RunTowers) on a classification set (an EvalSet or a path)."""
    eval_set = data if not isinstance(data, str | Path) else open_eval_set(data, labels=label_file)
    if eval_set.kind != "classification":
        raise LayoutError(f"{eval_set.source}: a {eval_set.layout} set is for retrieval, not zero-shot")
    features, targets = towers.encode(eval_set)
    labels, names = torch.tensor(targets), eval_set.class_names
    templates_name, templates = choose_templates(eval_set, templates)
    classifier = class_embeddings(towers.text, names, templates, towers.device)
    hits = ((features["embedding"] @ classifier.T).argmax(dim=1) == labels).float()
    correct = torch.zeros(len(names)).index_add_(0, labels, hits)
    counts = torch.zeros(len(names)).index_add_(0, labels, torch.ones(len(labels)))
    per_class = {name: round(float(c / n), 4) for name, c, n in zip(names, correct, counts, strict=True) if n}
    return {**eval_set.describe(), "run": str(towers.run_dir),
            "images": len(labels), "classes": len(names), "top1": round(float(hits.mean()), 4),
            "chance": round(1 / len(names), 4), "class_names_from": eval_set.class_names_from,
            "templates_from": templates_name, "templates": list(templates), "per_class_top1": per_class,
            "undecodable": towers.undecodable(eval_set),
            "per_example_correct": hits.int().tolist()}  # 1/0 per image in the set's order, for paired comparisons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--data", required=True, help="a classification set (see evaluation.datasets)")
    parser.add_argument("--labels", help="the label file of a flat ImageNet folder")
    parser.add_argument("--templates", help="openai | simple | a file of templates ({c} = the class name)")
    parser.add_argument("--out", help="JSON result (default: <run>/eval_zeroshot.json)")
    args = parser.parse_args(argv)
    try:
        result = zero_shot(RunTowers(args.run), args.data, args.templates, args.labels)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out or Path(args.run) / "eval_zeroshot.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"zero-shot top-1 on {result['source']}: {100 * result['top1']:.1f}% over {result['images']} images "
          f"and {result['classes']} classes (chance {100 * result['chance']:.1f}%; {len(result['templates'])} "
          f"templates from {result['templates_from']}); written to {out}")
    for entry in result["undecodable"]:
        print(undecodable_note(entry))


if __name__ == "__main__":
    main()
