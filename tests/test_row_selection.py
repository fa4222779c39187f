"""Rows selected before the layers that read them (issue 36): the same outputs and gradients as the layers run on
every row."""

import torch
from open_clip.transformer import text_global_pool

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
