"""Rows selected before the layers that read them (issue 36): the same outputs and gradients as the layers run on
every row."""

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from test_harmony import TEMPS, run_group, tiny_batch, tiny_model

from model.losses import mlm_loss, teacher_probs
from model.masking import mask_captions
from model.objectives.masked_text import MLM_LOGIT_CHUNKS
from model.text_tower import TextEncoder


def encode_normalising_every_row(encoder, tokens):
    """TextEncoder.encode as it was: ln_final on every (B, T) row, then the EOT row pooled."""
    text = encoder.transformer
    features = text.token_embedding(tokens) + text.positional_embedding[:tokens.shape[1]]  # (B, T, width)
    features = text.transformer(features, attn_mask=text.attn_mask[:tokens.shape[1], :tokens.shape[1]])
    return text_global_pool(text.ln_final(features), tokens, pool_type="argmax"), features


def test_the_final_norm_on_the_pooled_rows_only_gives_the_same_embedding_and_gradients():
    torch.manual_seed(0)
    encoder = TextEncoder(width=64, layers=2, heads=4, clip_dim=32)
    with torch.no_grad():  # a final norm that is not the identity, so that its gradients say something
        encoder.transformer.ln_final.weight.normal_(1.0, 0.2)
        encoder.transformer.ln_final.bias.normal_(0.0, 0.2)
    tokens = torch.randint(1, 1000, (5, 16))
    tokens[torch.arange(5), torch.tensor([3, 15, 7, 9, 1])] = 49407  # EOT at a different place in each caption
    results = []
    for encode in (encode_normalising_every_row, TextEncoder.encode):
        encoder.zero_grad()
        pooled, features = encode(encoder, tokens)
        (pooled.square().sum() + encoder.project(pooled).sum()).backward()
        results.append((pooled.detach(), features.detach(),
                        {name: param.grad.clone() for name, param in encoder.named_parameters()
                         if param.grad is not None}))
    (pooled_before, features_before, grads_before), (pooled_now, features_now, grads_now) = results
    assert torch.equal(pooled_now, pooled_before) and torch.equal(features_now, features_before)
    assert grads_now.keys() == grads_before.keys()
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_now[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def text_pass_with_heads_on_every_row(model, views, teacher):
    """The text objective's loss as it was: the student distillation head on every (B, T) row and the loss reading
    its masked rows through a (B, T) mask (centre statistics left out: the same code reads them now)."""
    settings, tokens = model.config.objectives["masked_text"], views["tokens"]
    masked_tokens, labels, masked = mask_captions(tokens, settings.mask_probability)
    _, features = model.text_student(masked_tokens)  # (B, T, width)
    mlm, _ = mlm_loss(model.mlm_decoder(features)[masked], labels[masked], model.mlm_decoder.predict,
                      MLM_LOGIT_CHUNKS)
    with torch.no_grad():
        teacher_tokens = model.teachers["text_distillation_head"](teacher["text_features"])  # (B, T, K)
    targets = teacher_probs(teacher_tokens, model.text_center, TEMPS["teacher_patch_temp"])
    student = model.text_distillation_head(features)  # (B, T, K)
    per_token = -(targets * F.log_softmax(student / settings.student_temp, dim=-1)).sum(-1)  # (B, T)
    masked = masked.float()
    distillation = ((per_token * masked).sum(-1) / masked.sum(-1).clamp(min=1.0)).mean()
    return settings.mlm_weight * mlm + settings.distillation_weight * distillation


def test_the_distillation_head_on_the_masked_rows_only_gives_the_same_text_loss_and_gradients():
    batch = tiny_batch()
    results = []
    for selected in (False, True):
        model = tiny_model(drop_path_rate=0.0)
        teacher = model.forward_teachers(batch)
        torch.manual_seed(5)  # the same caption masks
        if selected:
            loss = run_group(model, "masked_text", batch, teacher=teacher)[0]
        else:
            loss = text_pass_with_heads_on_every_row(model, batch, teacher)
            loss.backward()
        results.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()
                                        if param.grad is not None}))
    (loss_before, grads_before), (loss_now, grads_now) = results
    torch.testing.assert_close(loss_now, loss_before, rtol=1e-6, atol=1e-6)
    assert grads_now.keys() == grads_before.keys() and any("text_distillation_head" in name for name in grads_now)
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_now[name], grad, rtol=1e-5, atol=1e-7, msg=name)
