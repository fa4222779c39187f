"""Evaluations: recall, k-NN and the parallel linear-probe sweep against direct computations; `make eval`'s
runner end to end on a tiny run; bad held-out data gives a clear error."""

import json

import pytest
import torch
from conftest import fake_run, jpeg_bytes

import demo.dataset
from datapipe.common import shard_io
from evaluation import linear_probe, retrieval
from evaluation import run as eval_run


def test_recall_counts_how_many_candidates_beat_the_right_one():
    similarity = torch.tensor([[0.9, 0.1, 0.2],  # right answer first: rank 0
                               [0.8, 0.5, 0.6],  # two candidates above: rank 2
                               [0.1, 0.9, 0.3]])  # one above: rank 1
    assert retrieval.recall_at(similarity, torch.eye(3, dtype=torch.bool), ks=(1, 2, 3)) \
        == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_knn_is_the_weighted_vote_of_the_nearest_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.2, 1.0], [1.0, 0.3]])
    # k=2: test 0's neighbours are sample 2 (class 1, cos 0.98) and sample 1 (class 0, cos 0.29): class 1 wins.
    assert linear_probe.knn(train, labels, test, torch.tensor([1, 0]), classes=2, ks=(2,)) == {"2": 1.0}
    # k=3 with a high temperature: two class-0 votes outweigh one class-1 vote for test 0.
    assert linear_probe.knn(train, labels, test, torch.tensor([0, 0]), classes=2, ks=(3, 5), temperature=100.0) \
        == {"3": 1.0}


def test_knn_and_probe_scoring_give_the_same_a_chunk_at_a_time():
    features, labels = separable_features(per_class=20, classes=4)
    test, test_labels = separable_features(per_class=5, classes=4, seed=1)
    whole = linear_probe.knn(features, labels, test, test_labels, classes=4, ks=(10, 20))
    assert linear_probe.knn(features, labels, test, test_labels, classes=4, ks=(10, 20), chunk_elements=200) == whole
    weights, biases = torch.randn(3, 8, 4), torch.randn(3, 1, 4)
    torch.testing.assert_close(linear_probe.accuracies(weights, biases, test, test_labels, chunk_rows=3),
                               linear_probe.accuracies(weights, biases, test, test_labels))


def separable_features(per_class=30, classes=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_the_parallel_sweep_trains_each_rate_as_if_alone(monkeypatch):
    features, labels = separable_features()
    monkeypatch.setattr(linear_probe, "LEARNING_RATES", (0.01, 0.5))
    together, _ = linear_probe.train_linear_classifiers(features, labels, 3, epochs=3, batch_size=16)
    monkeypatch.setattr(linear_probe, "LEARNING_RATES", (0.01,))
    alone, _ = linear_probe.train_linear_classifiers(features, labels, 3, epochs=3, batch_size=16)
    torch.testing.assert_close(together[0], alone[0])  # the same start, order and rate: the same classifier
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_linear_probe_separates_separable_classes_and_keeps_every_rate():
    train, train_labels = separable_features(seed=0)
    test, test_labels = separable_features(seed=0)
    result = linear_probe.linear_probe(train, train_labels, test, test_labels, classes=3, epochs=20)
    assert result["top1"] > 0.95 and len(result["per_lr"]) == 13
    assert result["validation_images"] == 18 and result["train_images"] == 72  # 20% of each class
    assert result["per_lr"]["1e-05"]["test_top1"] < result["top1"]  # the smallest rate barely moves


@pytest.fixture(scope="module")
def tiny_eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_source")
    demo.dataset.generate(root, num_train=2, heldout_per_class=2, probe_per_class=3, heldout_pairs=24)
    return root


def test_make_eval_runs_every_evaluation_and_writes_json_table_and_plot(tmp_path, tiny_eval_data, capsys):
    run = fake_run(tmp_path, vit_size="micro", patch_size=8, global_crop_px=32)
    eval_run.main(["--run", str(run), "--zeroshot", str(tiny_eval_data / "heldout"),
                   "--retrieval", str(tiny_eval_data / "heldout_pairs"),
                   "--probe-train", str(tiny_eval_data / "probe_train"),
                   "--probe-test", str(tiny_eval_data / "heldout"), "--probe-epochs", "2"])
    results = json.loads((run / "eval.json").read_text())
    assert results["zeroshot"]["images"] == 60 and results["zeroshot"]["classes"] == 30
    assert results["retrieval"]["pairs"] == 24 and results["retrieval"]["chance_R@1"] == round(1 / 24, 4)
    assert set(results["linear_probe"]["knn_top1"]) == {"10", "20"}  # 90 training images: k=100, 200 left out
    table = (run / "eval.md").read_text()
    assert table.count("\n| ") == 1 + 1 + 6 + 1 + 2  # header, zero-shot, 6 recalls, probe, 2 k-NN
    assert (run / "plots" / "eval.png").stat().st_size > 0
    assert "eval done" in capsys.readouterr().out


def test_retrieval_on_a_set_none_of_whose_images_decode_is_refused_naming_them(tmp_path):
    run = fake_run(tmp_path / "run", vit_size="micro", patch_size=8, global_crop_px=32)
    shards = tmp_path / "heldout"
    shards.mkdir()
    shard_io.write_tar(shards / "000000.tar", [{"__key__": "good", "jpg": b"\xff\xd8not really", "txt": b"a cat"}])
    with pytest.raises(SystemExit, match=f"{shards}: no image to evaluate; none of its 1 image.s. decode .first: "
                                         f"{shards / '000000.tar'}: sample good.; run `make verify`"):
        retrieval.main(["--run", str(run), "--data", str(shards)])
    with pytest.raises(SystemExit, match="in none of the evaluation layouts"):
        retrieval.main(["--run", str(run), "--data", str(tmp_path / "run")])


def test_a_cuda_device_on_a_machine_without_one_is_refused_with_the_choices(tmp_path):
    from evaluation.towers import eval_device

    assert eval_device("cpu") == "cpu" and eval_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: this machine has no CUDA device; use --device cpu"):
            eval_run.main(["--run", str(tmp_path), "--zeroshot", str(tmp_path), "--device", "cuda"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluations_on_the_gpu_give_the_cpus_results(tmp_path, tiny_eval_data):
    runs = {device: fake_run(tmp_path / device, vit_size="micro", patch_size=8, global_crop_px=32)
            for device in ("cpu", "cuda")}  # the same weights; each its own feature cache
    data = eval_run.EvalData(zeroshot=str(tiny_eval_data / "heldout"),
                             retrieval=str(tiny_eval_data / "heldout_pairs"),
                             probe_train=str(tiny_eval_data / "probe_train"),
                             probe_test=str(tiny_eval_data / "heldout"), probe_epochs=2)
    on_cpu, on_gpu = (eval_run.evaluate(runs[device], data, device) for device in ("cpu", "cuda"))
    assert on_gpu["zeroshot"]["top1"] == pytest.approx(on_cpu["zeroshot"]["top1"], abs=1 / 60)
    assert on_gpu["retrieval"]["mean_recall"] == pytest.approx(on_cpu["retrieval"]["mean_recall"], abs=0.05)
    assert on_gpu["linear_probe"]["knn_top1"] == pytest.approx(on_cpu["linear_probe"]["knn_top1"], abs=0.05)


def test_images_that_do_not_decode_are_left_out_counted_and_named_by_file(tmp_path, capsys):
    """A class folder with a file PIL cannot identify and a truncated JPEG, a shard with a sample whose image does
    not decode: the evaluations go on without them, and the output and eval.json name them (path, or shard and
    sample key; never PIL's BytesIO)."""
    run = fake_run(tmp_path / "run", vit_size="micro", patch_size=8, global_crop_px=32)
    folders = tmp_path / "zeroshot"
    for name in ("cat", "dog"):
        (folders / name).mkdir(parents=True)
        (folders / name / "0.jpg").write_bytes(jpeg_bytes(color=(len(name), 0, 0)))
    (folders / "dog" / "1.jpg").write_bytes(b"not an image")
    (folders / "dog" / "2.jpg").write_bytes(jpeg_bytes()[:400])  # truncated
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    shard_io.write_tar(pairs / "000000.tar", [{"__key__": "bad", "jpg": b"\xff\xd8not really", "txt": b"a dog"},
                                              {"__key__": "good", "jpg": jpeg_bytes(), "txt": b"a cat"}])
    eval_run.main(["--run", str(run), "--zeroshot", str(folders), "--retrieval", str(pairs)])
    results = json.loads((run / "eval.json").read_text())
    assert results["zeroshot"]["images"] == 2 and results["zeroshot"]["per_class_top1"].keys() == {"cat", "dog"}
    assert results["zeroshot"]["undecodable"] == [{"source": str(folders), "images": 2, "first": [
        str(folders / "dog" / "1.jpg"), str(folders / "dog" / "2.jpg")]}]
    assert results["retrieval"]["images"] == 1 and results["retrieval"]["undecodable"] == [
        {"source": str(pairs), "images": 1, "first": [f"{pairs / '000000.tar'}: sample bad"]}]
    said = capsys.readouterr().out
    assert f"skipped 2 image(s) of {folders} that do not decode: {folders / 'dog' / '1.jpg'}, " in said
    assert f"skipped 1 image(s) of {pairs} that do not decode: {pairs / '000000.tar'}: sample bad" in said
    assert "BytesIO" not in said and "that do not decode" in (run / "eval.md").read_text()
