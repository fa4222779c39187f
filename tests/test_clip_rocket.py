"""The CLIP 🚀 family (docs/methods/clip_rocket.md, docs/methods/siamlip_byolip.md, docs/methods/barlip.md,
docs/methods/swalip.md): each loss written out from its formula with plain torch ops, the text dropout, the second logit
scale, the constant momentum of BYOLIP, the refusals, and the demo presets training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import methods_reading, train_steps
from test_slip_aclip import TINY_TRAINING
from tiny_models import tiny_config, tiny_model, tiny_overrides, tiny_preset_config

from model.meta_arch import MetaArch
from model.objectives.clip_rocket import tower_features
from model.objectives.swalip import sinkhorn_targets
from train.config import load_config
from train.schedules import Schedules

METHODS = methods_reading("clip_rocket")


def rocket_model(add_ons=None, **rocket):
    """CLIP 🚀 alone at tiny shapes (no text dropout unless `rocket` says), with the add-ons `add_ons` ({name:
    settings}); `rocket`: clip_rocket's settings."""
    return tiny_model({"clip_rocket": {"text_dropout": 0.0, **rocket}, **(add_ons or {})})


def tiny_captions(count, generator):
    """(count, 77) token ids: SOT, 5 + row words, EOT, padding."""
    tokens = torch.zeros(count, 77, dtype=torch.long)
    for row in range(count):
        length = 5 + row % 4
        tokens[row, 0] = 49406
        tokens[row, 1:length + 1] = torch.randint(300, 3000, (length,), generator=generator)
        tokens[row, length + 1] = 49407
    return tokens


def rocket_batch(batch=4, seed=1):
    """The clip_rocket recipe's views as `model_views` gives them: weak (1, B, 3, 32, 32), strong (2, B, ...),
    weak_text (1, B, 77), strong_text (2, B, 77)."""
    generator = torch.Generator().manual_seed(seed)
    return {"weak": torch.randn(1, batch, 3, 32, 32, generator=generator),
            "strong": torch.randn(2, batch, 3, 32, 32, generator=generator),
            "weak_text": tiny_captions(batch, generator)[None],
            "strong_text": tiny_captions(2 * batch, generator).unflatten(0, (2, batch))}


def group_loss(model, batch, group="clip_rocket"):
    teacher = model.forward_teachers(batch)
    return sum(loss for loss, _ in model.group_passes(group, batch, teacher=teacher))


# Written out from docs/methods/, independently of the objectives' code.

def smoothed_cross_entropy(logits, smoothing):
    """Targets 0.9 one-hot + 0.1 / N (smoothing 0.1) over the N columns; the matching row is the diagonal."""
    columns = logits.shape[1]
    targets = (1 - smoothing) * torch.eye(logits.shape[0], columns) + smoothing / columns
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def features_written_out(model, batch):
    """CLS after the final norm and EOT after ln_final of [weak, strong 1, strong 2], and the weak z pair."""
    vit, text = model.image_student, model.text_student
    images = [vit(crop)[:, 0] for crop in [batch["weak"][0], *batch["strong"]]]
    texts = [text.encode(tokens)[0] for tokens in [batch["weak_text"][0], *batch["strong_text"]]]
    z_image = F.normalize(images[0] @ vit.contrastive_projection, dim=-1)
    z_text = F.normalize(texts[0] @ text.transformer.text_projection, dim=-1)
    return images, texts, z_image, z_text


def rocket_loss_written_out(model, batch, smoothing, loss_mode="avg"):
    images, texts, z_image, z_text = features_written_out(model, batch)
    scale, local_scale = model.logit_scale.exp(), model.rocket_logit_scale.exp()
    h_images = [F.normalize(model.rocket_image_projector(cls), dim=-1) for cls in images[1:]]
    h_texts = [F.normalize(model.rocket_text_projector(eot), dim=-1) for eot in texts[1:]]
    global_image = smoothed_cross_entropy(scale * z_image @ z_text.T, 0.0)
    global_text = smoothed_cross_entropy(scale * z_text @ z_image.T, 0.0)
    local_image = sum(smoothed_cross_entropy(local_scale * h_images[j] @ h_texts[k].T, smoothing)
                      for j in range(2) for k in range(2)) / 4
    local_text = sum(smoothed_cross_entropy(local_scale * h_texts[k] @ h_images[j].T, smoothing)
                     for j in range(2) for k in range(2)) / 4
    loss_image = (global_image + 2 * local_image) / 3
    loss_text = (global_text + 2 * local_text) / 3
    loss = (loss_image + loss_text) / 2
    return 2 * loss if loss_mode == "sum" else loss


@pytest.mark.parametrize("loss_mode", ["avg", "sum"])
def test_clip_rocket_loss_is_the_mix_of_global_and_label_smoothed_local_terms(loss_mode):
    model, batch = rocket_model(loss_mode=loss_mode), rocket_batch()
    with torch.no_grad():
        model.rocket_logit_scale.fill_(math.log(7.0))  # the two scales told apart
        expected = rocket_loss_written_out(model, batch, 0.1, loss_mode)
        torch.testing.assert_close(group_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_the_label_smoothed_cross_entropy_matches_torch_at_0_1():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    written = smoothed_cross_entropy(logits, 0.1)
    torch.testing.assert_close(written, F.cross_entropy(logits, torch.arange(4), label_smoothing=0.1))
    assert not torch.isclose(written, F.cross_entropy(logits, torch.arange(4)))


def negative_cosine_written_out(prediction, target):
    cosine = (prediction * target).sum(-1) / (prediction.norm(dim=-1) * target.norm(dim=-1))
    return (2 - 2 * cosine).mean()


@pytest.mark.parametrize("method", ["siamlip", "byolip"])
def test_siamlip_adds_the_mean_of_its_ten_cross_modal_terms(method):
    """BYOLIP's EMA targets equal the students' at initialisation: the same value."""
    model, batch = rocket_model({method: {}}), rocket_batch()
    with torch.no_grad():
        images, texts, _, _ = features_written_out(model, batch)
        image_v = [model.siam_image_projector(cls) for cls in images]
        text_v = [model.siam_text_projector(eot) for eot in texts]
        image_p = [model.siam_image_predictor(v) for v in image_v]
        text_p = [model.siam_text_predictor(v) for v in text_v]
        terms = [negative_cosine_written_out(image_p[0], text_v[0]), negative_cosine_written_out(text_p[0], image_v[0])]
        terms += [negative_cosine_written_out(image_p[j], text_v[k]) for j in (1, 2) for k in (1, 2)]
        terms += [negative_cosine_written_out(text_p[j], image_v[k]) for j in (1, 2) for k in (1, 2)]
        assert len(terms) == 10
        expected = rocket_loss_written_out(model, batch, 0.1) + sum(terms) / 10
        torch.testing.assert_close(group_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_barlip_adds_the_barlow_twins_loss_averaged_over_five_pairs():
    model, batch = rocket_model({"barlip": {}}), rocket_batch()
    with torch.no_grad():
        images, texts, _, _ = features_written_out(model, batch)
        a = [model.barlip_image_projector(cls) for cls in images]
        b = [model.barlip_text_projector(eot) for eot in texts]

        def barlow(image, text):
            correlation = image.T @ text / image.shape[0]  # (K, K)
            total = 0.0
            for i in range(correlation.shape[0]):
                for j in range(correlation.shape[1]):
                    total += (correlation[i, j] - 1) ** 2 if i == j else 5e-3 * correlation[i, j] ** 2
            return 0.025 * total

        pairs = [(a[0], b[0])] + [(a[j], b[k]) for j in (1, 2) for k in (1, 2)]
        expected = rocket_loss_written_out(model, batch, 0.1) + sum(barlow(x, y) for x, y in pairs) / 5
        torch.testing.assert_close(group_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def sinkhorn_written_out(scores, epsilon, iterations):
    """Sinkhorn-Knopp on one rank with plain loops: Q = exp(S / eps)^T (K prototypes x B rows), made to sum to 1;
    each round every prototype row is set to total 1/K, then every sample column to 1/B; finally columns x B."""
    q = torch.exp(scores / epsilon).T.clone()
    prototypes, rows = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(prototypes):
            q[k] = q[k] / q[k].sum() / prototypes
        for b in range(rows):
            q[:, b] = q[:, b] / q[:, b].sum() / rows
    return (q * rows).T


def test_sinkhorn_rows_and_columns_on_a_4x4_example():
    scores = torch.tensor([[0.9, 0.1, -0.2, 0.3], [0.2, 0.8, 0.1, -0.5], [0.4, 0.3, 0.7, 0.0], [0.6, -0.1, 0.2, 0.5]])
    targets = sinkhorn_targets(scores, 0.05, 3)
    torch.testing.assert_close(targets, sinkhorn_written_out(scores, 0.05, 3))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))  # each row an assignment
    torch.testing.assert_close(targets.sum(dim=0), torch.ones(4), rtol=0.05, atol=0.05)  # prototypes near-equal


def test_swalip_adds_0_2_times_the_swapped_sinkhorn_prediction():
    model, batch = rocket_model({"swalip": {}}, label_smoothing=0.0), rocket_batch()
    with torch.no_grad():
        images, texts, _, _ = features_written_out(model, batch)
        h_images = [F.normalize(model.rocket_image_projector(cls), dim=-1) for cls in images[1:]]
        h_texts = [F.normalize(model.rocket_text_projector(eot), dim=-1) for eot in texts[1:]]
        scale = model.rocket_logit_scale.exp()
        image_scores = [[h_images[l1] @ h_texts[l2].T for l2 in (0, 1)] for l1 in (0, 1)]
        text_scores = [[h_texts[l1] @ h_images[l2].T for l2 in (0, 1)] for l1 in (0, 1)]

        def soft_ce(logits, targets):
            return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()

        swapped = 0.0
        for l1 in (0, 1):
            for l2 in (0, 1):
                image_targets = sinkhorn_written_out(image_scores[1 - l1][1 - l2], 0.05, 3)  # the swapped pair's
                text_targets = sinkhorn_written_out(text_scores[1 - l1][1 - l2], 0.05, 3)
                swapped += (soft_ce(scale * image_scores[l1][l2], image_targets) +
                            soft_ce(scale * text_scores[l1][l2], text_targets)) / 2 / 4
        expected = rocket_loss_written_out(model, batch, 0.0) + 0.2 * swapped
        torch.testing.assert_close(group_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_text_dropout_changes_only_the_strong_captions_in_training_and_nothing_in_evaluation():
    model, batch = rocket_model(text_dropout=0.5), rocket_batch()
    with torch.no_grad():
        plain = tower_features(model, batch, 0.0)
        dropped = tower_features(model, batch, 0.5)
        torch.testing.assert_close(dropped["text_eot"][0], plain["text_eot"][0])  # the weak caption never drops
        torch.testing.assert_close(dropped["z_text"], plain["z_text"])
        assert (dropped["text_eot"][1:] - plain["text_eot"][1:]).abs().amin(dim=-1).gt(0).all()  # every strong row
        torch.testing.assert_close(dropped["image_cls"], plain["image_cls"])
        model.eval()
        torch.testing.assert_close(tower_features(model, batch, 0.5)["text_eot"], plain["text_eot"])


def test_both_logit_scales_start_at_their_inits_and_are_clamped_after_the_step():
    model = rocket_model(logit_scale_max=100)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(model.rocket_logit_scale.item(), math.log(10), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
        model.rocket_logit_scale.fill_(-1.0)
    model.after_optimizer_step()
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)
    assert model.rocket_logit_scale.item() == 0.0


@pytest.mark.parametrize("method, teachers", [
    ("clip_rocket", set()), ("siamlip", set()), ("barlip", set()), ("swalip", set()),
    ("byolip", {"image_student", "text_student", "siam_image_projector", "siam_text_projector"}),
])
def test_only_byolip_has_teachers_and_the_add_ons_ride_in_clip_rockets_pass(method, teachers):
    model = tiny_preset_model(f"{method}/demo")
    assert set(model.teachers) == teachers
    assert model.backward_groups == ("clip_rocket",) + (() if method == "clip_rocket" else (method,))
    if method != "clip_rocket":
        assert list(model.group_passes(method, rocket_batch(), teacher={})) == []  # its term is in clip_rocket's


def test_byolip_momentum_is_constant_and_the_default_still_rises_to_one():
    byolip = load_config("byolip/demo").optim
    constant = Schedules(byolip, iterations_per_epoch=10, global_batch=256)
    assert {constant.at(step)["teacher_momentum"] for step in (0, 37, 79)} == {0.99}
    rising = Schedules(load_config("harmony/demo").optim, iterations_per_epoch=10, global_batch=256)
    assert rising.at(0)["teacher_momentum"] == 0.99 and rising.at(79)["teacher_momentum"] > 0.999


@pytest.mark.parametrize("objectives, message", [
    ({"siamlip": {}}, "model.objectives.siamlip needs clip_rocket: add model.objectives.clip_rocket"),
    ({"clip_rocket": {}, "siamlip": {}, "byolip": {}}, "model.objectives.siamlip cannot run with byolip"),
    ({"clip_rocket": {}, "swalip": {}}, "swalip trains CLIP 🚀 without label smoothing .*: set it to 0"),
    ({"clip_rocket": {"loss_mode": "mean"}}, "model.objectives.clip_rocket.loss_mode='mean'"),
    ({"clip_rocket": {"text_dropout": 1.0}}, "model.objectives.clip_rocket.text_dropout=1.0"),
    ({"clip_rocket": {}, "clip": {}}, "model.objectives.clip_rocket cannot run with clip"),
])
def test_nonsensical_clip_rocket_combinations_are_refused_with_what_to_change(objectives, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(objectives)


def test_the_recipe_must_make_the_clip_rocket_views():
    with pytest.raises(ValueError, match="weak"):
        load_config("clip_rocket/demo", ["data.views=auto"])


def tiny_preset_model(preset):
    """The preset's model at tiny shapes (its objectives and their settings kept)."""
    torch.manual_seed(0)
    return MetaArch(tiny_preset_config(preset))


@pytest.mark.parametrize("method", METHODS)
def test_every_clip_rocket_demo_preset_trains_with_finite_falling_loss(method):
    torch.manual_seed(2)
    history = train_steps(tiny_preset_model(f"{method}/demo"), rocket_batch(batch=6), steps=6)
    assert all(math.isfinite(loss) for loss in history), history
    assert sum(history[-2:]) < sum(history[:2]), history


@pytest.mark.parametrize("method", METHODS)
def test_every_clip_rocket_method_has_a_demo_and_a_cc3m_preset(method):
    for scale in ("demo", "cc3m"):
        assert load_config(f"{method}/{scale}").run.name == f"{method}_{scale}"
    cc3m = load_config(f"{method}/cc3m")
    assert cc3m.model.vit_size == "base" and cc3m.data.views == "clip_rocket"
    assert cc3m.data.batch_size * 8 == 4096 and math.isclose(cc3m.optim.lr * 4096 / 256, 3e-3)


@pytest.mark.parametrize("method", ["clip_rocket", "byolip"])
def test_the_trainer_runs_clip_rocket_methods_on_real_shards(demo_shards, tmp_path, method):
    """The clip_rocket recipe (weak, strong, weak_text, strong_text) through the loader, the trainer's step (BYOLIP:
    its EMA teachers), checkpoint and evaluation towers."""
    from train.pretrain import TEACHER_WEIGHTS, train

    preset = f"{method}/demo"
    run = train(load_config(preset, [*tiny_overrides(preset), *TINY_TRAINING, "data.views=clip_rocket",
                                     "run.max_steps=2", f"data.shards={demo_shards['train']}",
                                     f"run.out_dir={tmp_path}", f"run.name={method}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    assert (run / TEACHER_WEIGHTS).is_file()
