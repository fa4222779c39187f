"""How the image tower turns its tokens into one vector for the CLIP projection (docs/methods/clip.md).

cls: the CLS token (CLIP, Harmony). gap: the mean of the patch tokens, CLS excluded (open_clip's `avg` and timm's
`avg`; FLIP also averages the CLS token). max: the per-channel max over the patch tokens. map: multi-head attention
pooling as big_vision's MAPHead: a learned probe attends over every token, then x + MLP(LN(x)).
Every pooling reads the tokens after the ViT's final norm.
"""

import torch
from timm.layers import Mlp
from torch import nn

POOLINGS = ("cls", "gap", "max", "map")


class AttentionPool(nn.Module):
    """big_vision's MAPHead: probe (1, 1, D), xavier-initialised, as the query of one attention over all tokens."""

    def __init__(self, embed_dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, embed_dim))
        nn.init.xavier_uniform_(self.probe.view(1, embed_dim))
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))

    def forward(self, tokens):
        """(B, 1 + N, D) -> (B, D)."""
        probe = self.probe.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, _ = self.attention(probe, tokens, tokens, need_weights=False)  # (B, 1, D)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


def pool_tokens(tokens, pooling, attention_pool=None):
    """(B, 1 + N, D) tokens, CLS first -> (B, D) by `pooling` (one of POOLINGS)."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "gap":
        return tokens[:, 1:].mean(dim=1)
    if pooling == "max":
        return tokens[:, 1:].amax(dim=1)
    if pooling == "map":
        return attention_pool(tokens)
    raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
