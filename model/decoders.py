"""Decoders used only for their losses: MAE pixel decoder and causal MLM decoder."""

import numpy as np
import torch
from open_clip.transformer import QuickGELU, Transformer
from timm.models.vision_transformer import Block
from torch import nn

from model.vit import run_blocks


def sincos_2d_position_embedding(dim, grid):
    """(rows*cols, dim) fixed 2-D sine-cosine positions, half the channels per axis (as MAE)."""
    rows, cols = grid
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    frequencies = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def encode(positions):
        angles = positions.reshape(-1, 1) * frequencies[None]  # (rows*cols, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(ys), encode(xs)], axis=1)).float()


class MAEDecoder(nn.Module):
    """Linear(D -> width), mask tokens at removed positions, fixed sin-cos positions (our decision #1),
    `depth` blocks, LN, Linear(width -> p*p*3). Input: encoder tokens (B, 1 + kept, D) with CLS first."""

    def __init__(self, embed_dim, grid, patch_size=16, width=512, depth=8, num_heads=16):
        super().__init__()
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        positions = torch.cat([torch.zeros(1, width), sincos_2d_position_embedding(width, grid)])
        self.register_buffer("position_embedding", positions[None], persistent=False)  # (1, 1 + N, width)
        self.blocks = nn.Sequential(*[Block(width, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)  # the official code's initializer is never called: zero there
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, encoded, keep_indices, num_patches):
        """-> (B, num_patches, p*p*3) predictions in patch order."""
        tokens = self.embed(encoded)  # (B, 1 + kept, width)
        batch, width = tokens.shape[0], tokens.shape[-1]
        patches = self.mask_token.expand(batch, num_patches, width).to(tokens.dtype).clone()
        patches.scatter_(1, keep_indices[..., None].expand(-1, -1, width), tokens[:, 1:])  # un-shuffle
        tokens = torch.cat([tokens[:, :1], patches], dim=1) + self.position_embedding.to(tokens.dtype)
        return self.predict(self.norm(run_blocks(self.blocks, tokens, self.grad_checkpointing)))[:, 1:]


class MLMDecoder(nn.Module):
    """Causal CLIP-style blocks on the text encoder's token features, LN, Linear(width -> vocab)."""

    def __init__(self, vocab_size, width=512, depth=4, heads=8, context_length=77):
        super().__init__()
        self.transformer = Transformer(width, depth, heads, act_layer=QuickGELU)
        causal = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, vocab_size)

    def set_grad_checkpointing(self, enable=True):
        self.transformer.grad_checkpointing = enable

    def forward(self, token_features):
        """(B, T, width) -> (B, T, width) states after the final norm; `predict` maps them to vocabulary logits.

        The loss reads masked positions only, so the caller predicts just those (see losses.mlm_loss)."""
        length = token_features.shape[1]  # T <= context_length (captions may be trimmed)
        return self.norm(self.transformer(token_features, attn_mask=self.attn_mask[:length, :length]))
