"""Decoders used only for their losses: MAE pixel decoder (also MaskCLIP's token decoder), causal MLM decoder, and
the cross-modal decoder of MAE-CLIP and M3AE."""

import numpy as np
import torch
from open_clip.transformer import QuickGELU, Transformer
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.vit import run_blocks


def _sincos(dim, positions):
    """(n, dim) sines and cosines of the positions (n,) at dim/2 frequencies from 1 to 1/10000 (as MAE)."""
    frequencies = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    angles = positions.reshape(-1, 1) * frequencies[None]  # (n, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_position_embedding(dim, grid):
    """(rows*cols, dim) fixed 2-D sine-cosine positions, half the channels per axis (as MAE)."""
    rows, cols = grid
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    return torch.from_numpy(np.concatenate([_sincos(dim // 2, ys), _sincos(dim // 2, xs)], axis=1)).float()


def sincos_1d_position_embedding(dim, length):
    """(length, dim) fixed 1-D sine-cosine positions."""
    return torch.from_numpy(_sincos(dim, np.arange(length, dtype=np.float64))).float()


def with_mask_tokens(tokens, keep_indices, num_patches, mask_token):
    """Encoder tokens (B, 1 + kept, W), CLS first -> (B, 1 + num_patches, W): each kept patch at its place, the
    mask token at every removed one (MAE's un-shuffle)."""
    batch, width = tokens.shape[0], tokens.shape[-1]
    patches = mask_token.expand(batch, num_patches, width).to(tokens.dtype).clone()
    patches.scatter_(1, keep_indices[..., None].expand(-1, -1, width), tokens[:, 1:])
    return torch.cat([tokens[:, :1], patches], dim=1)


class MAEDecoder(nn.Module):
    """Linear(D -> width), mask tokens at removed positions, fixed sin-cos positions (our decision #1),
    `depth` blocks, LN, Linear(width -> out_dim): p*p*3 pixels (MAE), or D features (MaskCLIP's token decoder).
    Input: encoder tokens (B, 1 + kept, D) with CLS first."""

    def __init__(self, embed_dim, grid, patch_size=16, width=512, depth=8, num_heads=16, out_dim=None):
        super().__init__()
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        positions = torch.cat([torch.zeros(1, width), sincos_2d_position_embedding(width, grid)])
        self.register_buffer("position_embedding", positions[None], persistent=False)  # (1, 1 + N, width)
        self.blocks = nn.Sequential(*[Block(width, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, out_dim or patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)  # the official code's initializer is never called: zero there
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, encoded, keep_indices, num_patches):
        """-> (B, num_patches, out_dim) predictions in patch order."""
        tokens = with_mask_tokens(self.embed(encoded), keep_indices, num_patches, self.mask_token)  # (B, 1 + N, width)
        tokens = tokens + self.position_embedding.to(tokens.dtype)
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


class CrossModalDecoder(nn.Module):
    """One bidirectional decoder over both modalities (MAE-CLIP's cross-modality decoder, M3AE's decoder).

    Image: Linear(D -> width) of the encoder's kept tokens, the mask token at removed patches, fixed 2-D sin-cos
    positions. Text: Linear(text width -> width) of the text encoder's token features (masked captions), fixed 1-D
    sin-cos positions. A learned embedding per modality; `depth` blocks over the concatenation, padding after EOT
    ignored as keys; LN; Linear(width -> p*p*3) on the patches, Linear(width -> vocabulary) on the words (`predict`,
    applied by the caller at the masked words only)."""

    def __init__(self, image_dim, text_dim, grid, patch_size, vocab_size, width=512, depth=4, num_heads=16,
                 context_length=77):
        super().__init__()
        self.image_embed, self.text_embed = nn.Linear(image_dim, width), nn.Linear(text_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.modality_embedding = nn.Parameter(torch.zeros(2, width))  # image, text
        image_positions = torch.cat([torch.zeros(1, width), sincos_2d_position_embedding(width, grid)])
        self.register_buffer("image_positions", image_positions[None], persistent=False)  # (1, 1 + N, width)
        text_positions = sincos_1d_position_embedding(width, context_length)
        self.register_buffer("text_positions", text_positions[None], persistent=False)  # (1, 77, width)
        self.blocks = nn.ModuleList([Block(width, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.predict_pixels = nn.Linear(width, patch_size * patch_size * 3)
        self.predict = nn.Linear(width, vocab_size)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, image_tokens, keep_indices, num_patches, text_features, text_keys):
        """image_tokens: (B, 1 + kept, D); text_features: (B, T, text width); text_keys: (B, T) bool, True up to EOT.
        -> (pixel predictions (B, num_patches, p*p*3), word states (B, T, width))."""
        image = with_mask_tokens(self.image_embed(image_tokens), keep_indices, num_patches, self.mask_token)
        image = image + (self.image_positions + self.modality_embedding[0]).to(image.dtype)  # (B, 1 + N, width)
        length = text_features.shape[1]
        text = self.text_embed(text_features)
        text = text + (self.text_positions[:, :length] + self.modality_embedding[1]).to(text.dtype)  # (B, T, width)
        tokens = torch.cat([image, text], dim=1)
        keys = torch.cat([text_keys.new_ones(image.shape[:2]), text_keys], dim=1)[:, None, None]  # (B, 1, 1, L)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, keys, use_reentrant=False)
            else:
                tokens = block(tokens, attn_mask=keys)
        tokens = self.norm(tokens)
        return self.predict_pixels(tokens[:, 1:image.shape[1]]), tokens[:, image.shape[1]:]
