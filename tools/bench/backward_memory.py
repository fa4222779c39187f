"""Activation memory of Harmony's per-objective backward against one combined backward.

Counts the bytes each backward pass saves for its backward (saved-tensor hooks, each storage once).
A pass's backward frees its graph before the next pass's forward, so the peak is the largest pass; one
combined backward keeps every pass's graph alive until the end, so its peak is the sum.
Writes <out>/backward_memory.json and .png. On a GPU, torch.cuda.max_memory_allocated is added.

    python -m tools.bench.backward_memory --out runs/bench
"""

import argparse
import json
from pathlib import Path

import matplotlib
import torch

from datapipe.load.batch import Batch
from datapipe.load.recipes import EnclosingCrop
from model.meta_arch import MetaArch
from model.text_tower import trim_padding
from train.config import load_config
from train.step_inputs import model_views

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def saved_bytes(function):
    """(result of function(), bytes of distinct storages saved for backward while it ran)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, sum(storages.values())


def caption_tokens(batch):
    """(B, 77): captions of 19 BPE ids between SOT and EOT."""
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:20], tokens[:, 20] = 49406, 1000, 49407
    return tokens


def synthetic_batch(config, batch, local_px, locals_number, device):
    generator = torch.Generator().manual_seed(0)
    grid = config.global_crop_px // config.patch_size
    tokens = caption_tokens(batch)
    return dict(global_crops=torch.randn(2, batch, 3, config.global_crop_px, config.global_crop_px,
                                         generator=generator).to(device),
                local_crops=torch.randn(locals_number, batch, 3, local_px, local_px, generator=generator).to(device),
                ibot_masks=(torch.rand(2, batch, grid, grid, generator=generator) < 0.3).to(device),
                tokens=tokens.to(device))


def recipe_inputs(recipe, batch, device):
    """Random inputs shaped and named as the trainer gives `recipe`'s views to the objectives (train/step_inputs.py),
    captions untrimmed. Boxes: the source image is twice a crop's size; an enclosing view covers all of it, and
    crop k of another view is the crop-sized square at (k * size / 2, size / 4)."""
    generator = torch.Generator().manual_seed(0)
    images, boxes = {}, {}
    for name, view in recipe.image_views.items():
        size, count = view.size_px, len(view.crops)
        images[name] = torch.randn(count, batch, 3, size, size, generator=generator)  # (n, B, 3, H, W)
        if view.boxes:
            corners = [(0.0, 0.0, 2.0 * size, 2.0 * size)] if isinstance(view, EnclosingCrop) else \
                [(crop * size / 2, size / 4, float(size), float(size)) for crop in range(count)]
            boxes[name] = torch.tensor(corners)[:, None].expand(count, batch, 4)  # (n, B, 4)
    texts = {name: caption_tokens(batch)[None].expand(view.captions, -1, -1)  # (n, B, 77)
             for name, view in recipe.text_views.items()}
    inputs = model_views(Batch(images, texts, {}, boxes, keys=[str(row) for row in range(batch)]), trim=False)
    return {name: tensor.to(device) for name, tensor in inputs.items()}


BENCH_SCHEDULE = dict(teacher_cls_temp=0.04, teacher_patch_temp=0.07, clip_hard_weight=0.5)  # soft CLIP on


def backward_each_group(model, inputs, trim=True):
    """One step as the trainer runs it. Yields ("teachers", []) once the teachers ran (they save nothing for
    backward), then (group, [bytes each of its passes saved for backward]) after each group's backward passes.
    trim=False keeps the captions' padding (before/after figures)."""
    if trim:  # as the trainer: `tokens` (B, 77) and text views (n, B, 77) cut to their longest caption
        inputs = {name: trim_padding(tensor) if tensor.dtype == torch.long else tensor
                  for name, tensor in inputs.items()}
    teacher = model.forward_teachers(inputs)
    yield "teachers", []
    for group in model.backward_groups:
        passes, saved_per_pass = model.group_passes(group, inputs, teacher=teacher, **BENCH_SCHEDULE), []
        while True:
            item, saved = saved_bytes(lambda passes=passes: next(passes, None))
            if item is None:
                break
            item[0].backward()
            saved_per_pass.append(saved)
        yield group, saved_per_pass


def measure(name, config, batch, local_px, locals_number, device):
    torch.manual_seed(0)
    model = MetaArch(config).to(device)
    inputs = synthetic_batch(config, batch, local_px, locals_number, device)
    per_pass = {group: saved for group, saved in backward_each_group(model, inputs) if group != "teachers"}
    per_group = {group: max(saved) for group, saved in per_pass.items()}
    result = {"shape": name, "batch": batch, "saved_bytes_per_group": per_group, "saved_bytes_per_pass": per_pass,
              "per_group_backward_peak_bytes": max(per_group.values()),
              "combined_backward_peak_bytes": sum(sum(saved) for saved in per_pass.values())}
    result["per_group_vs_combined"] = round(result["per_group_backward_peak_bytes"] /
                                            result["combined_backward_peak_bytes"], 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--vit-s-batch", type=int, default=8)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    demo = load_config("harmony/demo")
    results = [
        measure("demo", demo.model, demo.data.batch_size, demo.data.local_crop_px, demo.data.local_crops_number,
                device),
        measure("ViT-S/16, 224 + 8 x 96 px", load_config("harmony/cc3m_vit_s").model, args.vit_s_batch, 96, 8,
                device),
    ]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "backward_memory.json").write_text(json.dumps({"device": device, "results": results}, indent=2))
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        groups = result["saved_bytes_per_group"]
        axis.bar(list(groups), [value / 2**20 for value in groups.values()], color="#6a9fd4")
        axis.axhline(result["combined_backward_peak_bytes"] / 2**20, color="#b04040", linestyle="--",
                     label="one combined backward")
        axis.set_ylabel("MiB saved for backward")
        axis.set_title(f"{result['shape']}, batch {result['batch']}: per-group peak = "
                       f"{result['per_group_vs_combined']:.2f}x combined", fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "backward_memory.png", dpi=120)
    for result in results:
        print(f"{result['shape']} (batch {result['batch']}): per-group backward peak "
              f"{result['per_group_backward_peak_bytes'] / 2**20:.0f} MiB vs one combined backward "
              f"{result['combined_backward_peak_bytes'] / 2**20:.0f} MiB = {result['per_group_vs_combined']:.2f}x")
    print(f"written to {out_dir / 'backward_memory.json'} and backward_memory.png")


if __name__ == "__main__":
    main()
