"""Linear probe and k-NN on frozen image features of a run's EMA teacher.

    python -m evaluation.linear_probe --run runs/harmony_demo --train shards/demo/source/probe_train \
        --test shards/demo/source/heldout

Both splits are classification sets in any layout evaluation.datasets reads, with the same classes (for
ImageNet: the train and val synset folders). Features are computed once, on the centre crop, and cached on
disk in <run>/features/ (evaluation.feature_cache: recomputed when the weights, the images or the feature code
change); the images are read a batch at a time, and scoring runs a chunk of rows at a time, so ImageNet-1k's
1.28M training images need memory only for their features:
- linear probe: the CLS token concatenated with the mean patch token (the official setting, n=1 +
  avgpool). 13 linear classifiers, one per learning rate in 1e-5 ... 0.1 scaled by batch / 256, train
  in parallel as one batched matmul (SGD, momentum 0.9, no weight decay, cosine schedule). The learning
  rate is chosen on a validation part of the training split; its classifier's test accuracy is the
  result, and every rate's figures are kept.
- k-NN (DINO's weighted vote): L2-normalized CLS tokens, cosine similarity, the top k neighbours vote
  with weight exp(similarity / 0.07), k in 10, 20, 100, 200 (those not above the training-set size).
Differences from the official script: no random-resized-crop augmentation while training the probe
(the features are cached), and the rate is chosen on a validation part rather than on the test set.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.datasets import LayoutError, open_eval_set
from evaluation.towers import RunTowers, undecodable_note

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
KNN_K = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


def split_for_validation(labels, fraction, seed=0):
    """(train indices, validation indices): `fraction` of each class (at least one) goes to validation."""
    generator = torch.Generator().manual_seed(seed)
    train, validation = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        validation.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(validation)


def train_linear_classifiers(features, labels, classes, epochs, batch_size, seed=0, device="cpu"):
    """One linear classifier per learning rate, trained together on `device` (a batch of features moved there
    at a time): weights (R, D, C), biases (R, 1, C)."""
    rates = torch.tensor(LEARNING_RATES, device=device) * batch_size / 256
    dim = features.shape[1]
    start = torch.randn(dim, classes, generator=torch.Generator().manual_seed(seed)) * 0.01
    weights = start.to(device).expand(len(rates), -1, -1).clone().requires_grad_()  # every rate from the same start
    biases = torch.zeros(len(rates), 1, classes, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([weights, biases], lr=1.0, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = -(-len(labels) // batch_size)
    total_steps = epochs * steps_per_epoch
    # lr 1.0 times a per-classifier factor: scale each classifier's gradient by its own rate.
    scale = rates[:, None, None]
    shuffle = torch.Generator().manual_seed(seed)  # its own stream: the order does not depend on the rates
    for step in tqdm(range(total_steps), desc="linear probe", unit="step", leave=False):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(labels), generator=shuffle)
        rows = order[(step % steps_per_epoch) * batch_size:(step % steps_per_epoch + 1) * batch_size]
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total_steps))
        batch = features[rows].to(device).expand(len(rates), -1, -1)  # (R, b, D)
        logits = torch.baddbmm(biases, batch, weights)  # (R, b, C)
        targets = labels[rows].to(device).repeat(len(rates))
        loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum") / len(rows)
        optimizer.zero_grad()
        loss.backward()  # the classifiers are independent: each gets its own gradient
        weights.grad *= scale
        biases.grad *= scale
        optimizer.step()
    return weights.detach().cpu(), biases.detach().cpu()


def correct(weights, biases, features, labels, chunk_rows=4096, device="cpu"):
    """(R, rows) bool: whether each classifier's top-1 is right on each row; scored a chunk at a time on `device`."""
    weights, biases, chunks = weights.to(device), biases.to(device), []
    for start in range(0, len(labels), chunk_rows):
        rows = features[start:start + chunk_rows].to(device)
        logits = torch.baddbmm(biases, rows.expand(len(weights), -1, -1), weights)  # (R, chunk, C)
        chunks.append(logits.argmax(dim=-1).cpu() == labels[start:start + chunk_rows])
    return torch.cat(chunks, dim=1)


def accuracies(weights, biases, features, labels, chunk_rows=4096, device="cpu"):
    """Top-1 accuracy of each classifier: (R,)."""
    return correct(weights, biases, features, labels, chunk_rows, device).float().mean(dim=1)


def linear_probe(train_features, train_labels, test_features, test_labels, classes, epochs=100, batch_size=256,
                 validation_fraction=0.2, device="cpu"):
    fit, validation = split_for_validation(train_labels, validation_fraction)
    batch_size = min(batch_size, len(fit))
    weights, biases = train_linear_classifiers(train_features[fit], train_labels[fit], classes, epochs, batch_size,
                                               device=device)
    validation_accuracy = accuracies(weights, biases, train_features[validation], train_labels[validation],
                                     device=device)
    test_correct = correct(weights, biases, test_features, test_labels, device=device)  # (R, test rows)
    test_accuracy = test_correct.float().mean(dim=1)
    best = int(validation_accuracy.argmax())
    return {"top1": round(float(test_accuracy[best]), 4), "chosen_lr": LEARNING_RATES[best],
            "epochs": epochs, "batch_size": batch_size, "train_images": len(fit), "validation_images": len(validation),
            "per_lr": {str(rate): {"validation_top1": round(float(v), 4), "test_top1": round(float(t), 4)}
                       for rate, v, t in zip(LEARNING_RATES, validation_accuracy, test_accuracy, strict=True)},
            "per_example_correct": test_correct[best].int().tolist()}  # the chosen rate's 1/0 per test image


def knn_correct(train_features, train_labels, test_features, test_labels, classes, ks=KNN_K,
                temperature=KNN_TEMPERATURE, chunk_elements=1 << 26, device="cpu"):
    """{k: (test rows,) bool, whether DINO's weighted k-NN vote is right} on `device`; ks above the training-set
    size are left out. Test rows are compared with every training row a chunk at a time (about chunk_elements
    similarities at once)."""
    ks = [k for k in ks if k <= len(train_labels)]
    if not ks:
        return {}
    train, train_labels = F.normalize(train_features.to(device), dim=-1), train_labels.to(device)
    chunks = []
    chunk_rows = max(1, chunk_elements // len(train))
    for start in range(0, len(test_labels), chunk_rows):
        test = F.normalize(test_features[start:start + chunk_rows].to(device), dim=-1)
        similarity, neighbours = (test @ train.T).topk(max(ks), dim=1)  # (chunk, k_max)
        votes = F.one_hot(train_labels[neighbours], classes).float() * (similarity / temperature).exp()[..., None]
        right = test_labels[start:start + chunk_rows].to(device)
        chunks.append(torch.stack([votes[:, :k].sum(dim=1).argmax(dim=1) == right for k in ks]).cpu())  # (ks, chunk)
    return dict(zip(ks, torch.cat(chunks, dim=1), strict=True))


def knn(train_features, train_labels, test_features, test_labels, classes, ks=KNN_K,
        temperature=KNN_TEMPERATURE, chunk_elements=1 << 26, device="cpu"):
    """{k: top-1} of knn_correct's vote (the same arguments)."""
    hits = knn_correct(train_features, train_labels, test_features, test_labels, classes, ks, temperature,
                       chunk_elements, device)
    return top1_by_k(hits)


def top1_by_k(hits):
    """{"k": top-1 rounded} of knn_correct's {k: (rows,) bool}."""
    return {str(k): round(float(right.float().mean()), 4) for k, right in hits.items()}


def reported_k(ks):
    """The k whose k-NN result is reported (DINO's 20 when there, else the smallest) of string ks, or None."""
    return "20" if "20" in ks else min(ks, key=int, default=None)


def probe(towers, train_data, test_data, epochs=100, train_labels_file=None, test_labels_file=None):
    """Linear probe and k-NN of `towers` (a RunTowers) from one classification set to another with the same
    classes (EvalSets or paths in any layout evaluation.datasets reads)."""
    train_set, test_set = (data if not isinstance(data, str | Path) else open_eval_set(data, labels=labels)
                           for data, labels in ((train_data, train_labels_file), (test_data, test_labels_file)))
    for eval_set in (train_set, test_set):
        if eval_set.kind != "classification":
            raise LayoutError(f"{eval_set.source}: a {eval_set.layout} set has no classes for the probe")
    if train_set.class_names != test_set.class_names:
        raise ValueError(f"{train_set.source} and {test_set.source} have different classes; the probe needs the "
                         f"same classes in both ({len(train_set.class_names)} vs {len(test_set.class_names)})")
    train, train_targets = towers.encode(train_set)
    test, test_targets = towers.encode(test_set)
    train_labels, test_labels = torch.tensor(train_targets), torch.tensor(test_targets)
    classes = len(train_set.class_names)

    def linear_features(features):
        return torch.cat([features["cls"], features["patch_mean"]], dim=1)  # (n, 2D)

    return {"train": str(train_set.source), "test": str(test_set.source), "run": str(towers.run_dir),
            "classes": classes, "chance": round(1 / classes, 4), "test_images": len(test_labels),
            "linear": linear_probe(linear_features(train), train_labels, linear_features(test), test_labels,
                                   classes, epochs, device=towers.device),
            **knn_results(knn_correct(train["cls"], train_labels, test["cls"], test_labels, classes,
                                      device=towers.device)),
            "undecodable": towers.undecodable(train_set, test_set)}


def knn_results(hits):
    """knn_top1 of every k and, for paired comparisons, the reported k's 1/0 per test image (in the set's order)."""
    top1 = top1_by_k(hits)
    k = reported_k(top1)
    return {"knn_top1": top1, "knn_per_example_correct": {k: hits[int(k)].int().tolist()} if k else {}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--train", required=True, help="training classification set (see evaluation.datasets)")
    parser.add_argument("--test", required=True, help="test classification set with the same classes")
    parser.add_argument("--train-labels", help="the label file of a flat ImageNet training folder")
    parser.add_argument("--test-labels", help="the label file of a flat ImageNet test folder")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", help="JSON result (default: <run>/eval_linear_probe.json)")
    args = parser.parse_args(argv)
    try:
        result = probe(RunTowers(args.run), args.train, args.test, args.epochs, args.train_labels, args.test_labels)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out or Path(args.run) / "eval_linear_probe.json")
    out.write_text(json.dumps(result, indent=2))
    knn_text = ", ".join(f"k={k} {100 * top1:.1f}%" for k, top1 in result["knn_top1"].items())
    print(f"linear probe top-1 {100 * result['linear']['top1']:.1f}% (lr {result['linear']['chosen_lr']}) and "
          f"k-NN {knn_text} on {result['test_images']} test images, {result['classes']} classes "
          f"(chance {100 * result['chance']:.1f}%); written to {out}")
    for entry in result["undecodable"]:
        print(undecodable_note(entry))


if __name__ == "__main__":
    main()
