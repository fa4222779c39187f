"""The causal CLIP text transformer (open_clip's), with one extra id for [MASK].

Returns the pooled, projected EOT embedding and the token features before the final norm,
which the MLM decoder and the text-distillation head read (HARMONY.md 2.4-2.5). open_clip's
own forward returns the features after the final norm, so we call its parts in order.
"""

from open_clip.transformer import QuickGELU, TextTransformer, text_global_pool
from torch import nn

from model.masking import MASK_ID

CONTEXT_LENGTH = 77


class TextEncoder(nn.Module):
    def __init__(self, width=512, layers=12, heads=8, clip_dim=512):
        super().__init__()
        self.width = width
        self.transformer = TextTransformer(
            context_length=CONTEXT_LENGTH, vocab_size=MASK_ID + 1, width=width, heads=heads, layers=layers,
            output_dim=clip_dim, act_layer=QuickGELU, pool_type="argmax")

    def forward(self, tokens):
        """tokens: (B, 77) ids -> (embedding (B, clip_dim), token features before ln_final (B, 77, width))."""
        text = self.transformer
        features = text.token_embedding(tokens) + text.positional_embedding  # (B, 77, width)
        features = text.transformer(features, attn_mask=text.attn_mask)  # causal
        pooled = text_global_pool(text.ln_final(features), tokens, pool_type="argmax")  # EOT: the largest id
        return pooled @ text.text_projection, features
