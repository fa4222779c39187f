"""The causal CLIP text transformer (open_clip's), with one extra id for [MASK].

Its MLPs use GELU, open_clip's default for towers trained from scratch (the official code keeps
OpenAI CLIP's QuickGELU). With GELU in both towers, open_clip's own model config describes our
image and text towers at every ViT size, so an export loads with `open_clip.create_model(...)` alone.

Returns the pooled, projected EOT embedding and the token features before the final norm,
which the MLM decoder and the text-distillation head read (docs/methods/harmony.md 2.4-2.5); `encode` stops
before the projection (CLIP 🚀's projectors read the EOT features after ln_final) and can drop out
the residual stream at each block's input (CLIP 🚀's text dropout). open_clip's own forward returns
the features after the final norm, so we call its parts in order.

Attention is causal, so the features up to EOT do not depend on the padding after it: the encoder
accepts captions cut to any length T <= 77, and `trim_padding` cuts a batch to its longest caption.
"""

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from model.masking import MASK_ID

CONTEXT_LENGTH = 77
TRIM_MULTIPLE = 16  # trimmed lengths are 16, 32, 48, 64 or 77: few shapes for torch.compile and kernels


def trim_padding(tokens, multiple=TRIM_MULTIPLE, longest=None):
    """(..., 77) -> (..., T), e.g. (B, 77) or a text view's (n, B, 77): the padding columns after the longest
    caption removed, T rounded up to `multiple` (at most 77). Every loss reads positions up to EOT only, so the
    result is the same. longest: the position after the last non-padding id, when the host knows it (the loader
    counts it before the copy: Batch.caption_lengths); otherwise read from `tokens`, one host read."""
    if longest is None:
        positions = torch.arange(1, tokens.shape[-1] + 1, device=tokens.device)
        longest = int((positions * (tokens != 0)).max())  # position after the last non-padding id (id 0 is "!")
    length = min(tokens.shape[-1], -(-max(longest, 1) // multiple) * multiple)
    return tokens[..., :length]


class TextEncoder(nn.Module):
    def __init__(self, width=512, layers=12, heads=8, clip_dim=512):
        super().__init__()
        self.width = width
        self.transformer = TextTransformer(
            context_length=CONTEXT_LENGTH, vocab_size=MASK_ID + 1, width=width, heads=heads, layers=layers,
            output_dim=clip_dim, act_layer=nn.GELU, pool_type="argmax")

    def set_grad_checkpointing(self, enable=True):
        self.transformer.set_grad_checkpointing(enable)

    def encode(self, tokens, residual_dropout=0.0):
        """tokens: (B, T) ids, T <= 77 -> (EOT features after ln_final, before the projection (B, width), token
        features before ln_final (B, T, width)).

        residual_dropout: in training, dropout of the residual stream at the input of every block (CLIP 🚀's text
        dropout on its strong captions); nothing in evaluation."""
        text, length = self.transformer, tokens.shape[1]
        features = text.token_embedding(tokens) + text.positional_embedding[:length]  # (B, T, width)
        hooks = []
        if residual_dropout > 0 and self.training:
            hooks = [block.register_forward_pre_hook(
                lambda _, inputs: (F.dropout(inputs[0], residual_dropout), *inputs[1:]))
                for block in text.transformer.resblocks]
        try:
            features = text.transformer(features, attn_mask=text.attn_mask[:length, :length])  # causal
        finally:
            for hook in hooks:
                hook.remove()
        # EOT (the largest id) is pooled first: ln_final normalises each row alone, so only the pooled rows need it
        pooled = text.ln_final(text_global_pool(features, tokens, pool_type="argmax"))  # (B, width)
        return pooled, features

    def project(self, pooled):
        """(B, width) EOT features -> (B, clip_dim), the CLIP text embedding (not normalized)."""
        return pooled @ self.transformer.text_projection

    def forward(self, tokens, residual_dropout=0.0):
        """tokens: (B, T) ids, T <= 77 -> (embedding (B, clip_dim), token features before ln_final (B, T, width))."""
        pooled, features = self.encode(tokens, residual_dropout)
        return self.project(pooled), features
