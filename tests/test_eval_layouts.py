"""Evaluation sets in the layouts they are distributed in (generated here, tiny): ImageNet synset folders and a
flat folder with a label file, CLIP_benchmark webdataset sets, Karpathy-split JSON; ties in retrieval ranked
by index; features cached on disk and recomputed when what they come from changes."""

import io
import json

import pytest
import torch
from conftest import fake_run
from PIL import Image

import demo.dataset
from datapipe.common import shard_io
from evaluation import datasets, feature_cache, retrieval, zeroshot
from evaluation.towers import RunTowers
from train.pretrain import TEACHER_WEIGHTS


def jpeg(seed, size_px=40):
    pixels = torch.randint(0, 256, (size_px, size_px, 3), generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_source")
    demo.dataset.generate(root, num_train=2, heldout_per_class=1, probe_per_class=1, heldout_pairs=12)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("run"), vit_size="micro", patch_size=8, global_crop_px=32)


def test_synset_folders_take_open_clips_imagenet_names_and_the_80_templates(tmp_path, run):
    for index, synset in enumerate(("n01443537", "n01440764")):  # goldfish, tench
        (tmp_path / synset).mkdir()
        (tmp_path / synset / f"ILSVRC2012_val_{index:08d}.JPEG").write_bytes(jpeg(index))
    eval_set = datasets.open_eval_set(tmp_path)
    assert eval_set.layout == "imagenet synset folders"
    assert eval_set.class_names == ["tench", "goldfish"]  # folders in synset order, ImageNet class indices 0 and 1
    assert [label for _, label in eval_set.samples()] == [0, 1]
    result = zeroshot.zero_shot(RunTowers(run), tmp_path)
    assert result["templates_from"] == "openai" and len(result["templates"]) == 80
    assert result["templates"][0] == "a bad photo of a {}." and "open_clip" in result["class_names_from"]
    (tmp_path / "n99999999").mkdir()
    with pytest.raises(datasets.LayoutError, match="n99999999"):
        datasets.open_eval_set(tmp_path)


def test_a_flat_folder_reads_its_label_file_in_each_format(tmp_path):
    for index in range(3):
        (tmp_path / f"ILSVRC2012_val_{index + 1:08d}.JPEG").write_bytes(jpeg(index))
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG 999\n"
                                      "ILSVRC2012_val_00000003.JPEG n01443537\n")
    eval_set = datasets.open_eval_set(tmp_path)
    assert [label for _, label in eval_set.samples()] == [0, 999, 1] and len(eval_set.class_names) == 1000
    assert eval_set.class_names[999] == "toilet paper"
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01440764 1 2 3 4\n"
                      "ILSVRC2012_val_00000001,n01443537 1 2 3 4 n01443537 5 6 7 8\n"
                      "ILSVRC2012_val_00000003,n01440764 1 2 3 4\n")
    assert [label for _, label in datasets.open_eval_set(tmp_path, labels=kaggle).samples()] == [1, 0, 0]
    devkit = tmp_path / "ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    with pytest.raises(datasets.LayoutError, match="another order"):
        datasets.open_eval_set(tmp_path, labels=devkit)
    (tmp_path / "ILSVRC2012_val_00000004.JPEG").write_bytes(jpeg(4))
    with pytest.raises(datasets.LayoutError, match="1 image.s. have no label .*ILSVRC2012_val_00000004"):
        datasets.open_eval_set(tmp_path)


def test_a_folder_in_no_layout_is_refused_with_the_layouts_it_could_be(tmp_path):
    (tmp_path / "notes.txt").write_text("not images")
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.LayoutError, match="none of the evaluation layouts; expected class folders"):
        datasets.open_eval_set(tmp_path)


def write_clip_benchmark_classification(folder, demo_source):
    """A CLIP_benchmark-layout copy of the demo's held-out split, with the 7 simple templates."""
    heldout = datasets.open_eval_set(demo_source / "heldout")
    (folder / "test").mkdir(parents=True)
    (folder / "classnames.txt").write_text("\n".join(heldout.class_names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(template.replace("{}", "{c}") for template in datasets.TEMPLATE_SETS["simple"]) + "\n")
    samples = [{"__key__": f"s{index:04d}", "jpg": path.read_bytes(), "cls": str(label).encode()}
               for index, (path, label) in enumerate(heldout.samples())]
    shard_io.write_tar(folder / "test" / "0.tar", samples[:25])
    shard_io.write_tar(folder / "test" / "1.tar", samples[25:])
    (folder / "test" / "nshards.txt").write_text("2\n")


def test_a_clip_benchmark_copy_of_the_held_out_split_gives_the_folders_zero_shot(tmp_path, demo_source, run):
    write_clip_benchmark_classification(tmp_path / "wds_heldout", demo_source)
    towers = RunTowers(run)
    from_folder = zeroshot.zero_shot(towers, demo_source / "heldout")
    from_wds = zeroshot.zero_shot(towers, tmp_path / "wds_heldout")
    assert from_wds["layout"] == "clip_benchmark webdataset" and from_wds["images"] == from_folder["images"] == 30
    assert from_wds["templates"] == from_folder["templates"] and from_wds["templates_from"].endswith("templates.txt")
    assert from_wds["per_class_top1"] == from_folder["per_class_top1"] and from_wds["top1"] == from_folder["top1"]


def test_karpathy_json_and_clip_benchmark_retrieval_give_the_held_out_pairs_recall(tmp_path, demo_source, run):
    pairs = list(shard_io.read_samples(sorted((demo_source / "heldout_pairs").glob("*.tar"))))
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    karpathy = {"images": [{"filepath": "val2014", "filename": "leftover.jpg", "split": "train",
                            "sentences": [{"raw": "not in the test split"}]}]}
    for sample in pairs:
        (tmp_path / "images" / "val2014" / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
        karpathy["images"].append({"filepath": "val2014", "filename": f"{sample['__key__']}.jpg", "split": "test",
                                   "sentences": [{"raw": sample["txt"].decode()}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    wds = tmp_path / "wds_pairs"
    (wds / "test").mkdir(parents=True)
    (wds / "dataset_type.txt").write_text("retrieval\n")
    shard_io.write_tar(wds / "test" / "0.tar", [{"__key__": sample["__key__"], "webp": sample["jpg"],
                                                 "txt": sample["txt"]} for sample in pairs])
    towers = RunTowers(run)
    from_shards = retrieval.retrieval(towers, demo_source / "heldout_pairs")
    from_json = retrieval.retrieval(towers, tmp_path / "dataset_coco.json", tmp_path / "images")
    from_wds = retrieval.retrieval(towers, wds)
    recalls = [key for key in from_shards if "_R@" in key]
    assert from_json["images"] == from_wds["images"] == 12 and from_json["layout"].startswith("karpathy")
    assert {key: from_json[key] for key in recalls} == {key: from_shards[key] for key in recalls}
    assert {key: from_wds[key] for key in recalls} == {key: from_shards[key] for key in recalls}


def test_five_captions_per_image_read_alike_from_karpathy_json_and_clip_benchmark(tmp_path, demo_source, run):
    """COCO's and Flickr30k's Karpathy splits give five captions per image: each image counts a hit when any
    of its five ranks high, each caption when its one image does; both readers give the same recalls."""
    pairs = list(shard_io.read_samples(sorted((demo_source / "heldout_pairs").glob("*.tar"))))
    captions = [sample["txt"].decode() for sample in pairs]
    five = {index: [captions[(index + shift) % len(pairs)] + f" ({shift})" for shift in range(5)]
            for index in range(len(pairs))}
    (tmp_path / "images").mkdir()
    karpathy = {"images": [{"filename": f"{sample['__key__']}.jpg", "split": "test",
                            "sentences": [{"raw": caption} for caption in five[index]]}
                           for index, sample in enumerate(pairs)]}
    for sample in pairs:
        (tmp_path / "images" / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    wds = tmp_path / "wds_pairs"
    (wds / "test").mkdir(parents=True)
    (wds / "dataset_type.txt").write_text("retrieval\n")
    shard_io.write_tar(wds / "test" / "0.tar", [{"__key__": sample["__key__"], "webp": sample["jpg"],
                                                 "txt": "\n".join(five[index]).encode()}
                                                for index, sample in enumerate(pairs)])
    towers = RunTowers(run)
    from_json = retrieval.retrieval(towers, tmp_path / "dataset_flickr30k.json", tmp_path / "images")
    from_wds = retrieval.retrieval(towers, wds)
    assert from_json["images"] == from_wds["images"] == 12 and from_json["captions"] == from_wds["captions"] == 60
    recalls = [key for key in from_json if "_R@" in key and not key.startswith("chance")]
    assert {key: from_json[key] for key in recalls} == {key: from_wds[key] for key in recalls}


def test_retrieval_ranks_ties_by_index_and_counts_any_of_an_images_captions():
    similarity = torch.tensor([[0.5, 0.5, 0.1, 0.0],   # right answer (1) tied with an earlier one: rank 1
                               [0.5, 0.5, 0.1, 0.0],   # right answer (0) tied with a later one: rank 0
                               [0.9, 0.5, 0.8, 0.7]])  # right answers 2 and 3: the better (2) is second
    positive = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert retrieval.recall_at(similarity, positive, ks=(1, 2)) == pytest.approx({1: 1 / 3, 2: 1.0})


def test_features_are_reused_until_the_weights_or_an_image_change(tmp_path, demo_source, monkeypatch):
    run = fake_run(tmp_path / "run", vit_size="micro", patch_size=8, global_crop_px=32)
    data = tmp_path / "data"
    (data / "red_square").mkdir(parents=True)
    (data / "red_square" / "0.jpg").write_bytes(jpeg(0))
    (data / "blue_circle").mkdir()
    (data / "blue_circle" / "0.jpg").write_bytes(jpeg(1))
    computed = []
    compute = feature_cache._compute
    monkeypatch.setattr(feature_cache, "_compute", lambda *args: computed.append(1) or compute(*args))
    first, _ = RunTowers(run).encode(datasets.open_eval_set(data))
    again, _ = RunTowers(run).encode(datasets.open_eval_set(data))
    assert len(computed) == 1 and torch.equal(first["embedding"], again["embedding"])
    (data / "blue_circle" / "0.jpg").write_bytes(jpeg(2, size_px=48))  # another image under the same name
    changed_image, _ = RunTowers(run).encode(datasets.open_eval_set(data))
    assert len(computed) == 2 and not torch.equal(changed_image["embedding"][0], first["embedding"][0])
    weights = torch.load(run / TEACHER_WEIGHTS, weights_only=True)  # a new checkpoint: other image-tower weights
    weights["image_tower"]["contrastive_projection"] *= -1
    torch.save(weights, run / TEACHER_WEIGHTS)
    new_weights, _ = RunTowers(run).encode(datasets.open_eval_set(data))
    assert len(computed) == 3
    torch.testing.assert_close(new_weights["embedding"], -changed_image["embedding"])
    assert len(list((run / "features").iterdir())) == 1  # the older entries of the set are gone
