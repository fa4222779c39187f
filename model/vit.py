"""Vision Transformer from timm layers, with what Harmony needs on top.

- iBOT: masked patch embeddings are replaced by a learned `mask_token` before positions are added;
- MAE: tokens can be dropped per sample (`keep_indices`) after positions are added;
- global and local crop sizes in one model: position embeddings are resized to the grid as the official
  code (DINO's `interpolate_pos_encoding`): bicubic with a scale factor of (grid + 0.1) / base grid, no
  antialias (timm's `resample_abs_pos_embed` resizes to the exact size with antialias: about 6% apart
  on a 14x14 -> 6x6 table);
- activation checkpointing per block (`grad_checkpointing`), for large ViTs on small GPUs;
- `contrastive_projection` maps the pooled tokens (model/pooling.py: CLS, GAP, MAX or MAP) to the CLIP space.
Parameter names match timm's `vit_*_patch16_224` (cls_token, pos_embed, patch_embed.proj,
blocks.N, norm), so `export_timm_state_dict` is a plain copy that leaves out our extras.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from model.pooling import POOLINGS, AttentionPool, pool_tokens


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int


VIT_SIZES = {
    "micro": ViTSize(96, 4, 3),  # CPU tests and the demo
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}
NOT_IN_TIMM = ("mask_token", "contrastive_projection", "attention_pool.")


def run_blocks(blocks, tokens, checkpointing):
    """tokens through the nn.Sequential `blocks`; with `checkpointing` while gradients are on, each block is run
    again in the backward instead of keeping its activations (timm's checkpoint_seq)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint_seq(blocks, tokens, use_reentrant=False)
    return blocks(tokens)


class VisionTransformer(nn.Module):
    def __init__(self, size="base", patch_size=16, img_size=224, clip_dim=512, drop_path_rate=0.0,
                 mlp_ratio=4.0, pooling="cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        dims = VIT_SIZES[size]
        self.pooling = pooling
        self.embed_dim, self.patch_size = dims.embed_dim, patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dims.embed_dim, strict_img_size=False)
        self.base_grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dims.embed_dim))
        drop_path = torch.linspace(0, drop_path_rate, dims.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(dims.embed_dim, dims.num_heads, mlp_ratio, qkv_bias=True, drop_path=rate,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for rate in drop_path])
        self.norm = nn.LayerNorm(dims.embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dims.embed_dim))  # iBOT's masked_embed, zero init
        self.contrastive_projection = nn.Parameter(torch.randn(dims.embed_dim, clip_dim) * dims.embed_dim ** -0.5)
        if pooling == "map":
            self.attention_pool = AttentionPool(dims.embed_dim, dims.num_heads, mlp_ratio)
        self.grad_checkpointing = False  # recompute each block in the backward instead of keeping its activations
        self._init_weights()

    def _init_weights(self):  # the attention pool's probe keeps its xavier init
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def position_embedding(self, grid):
        """(1, 1 + rows*cols, D) for a patch grid of (rows, cols), resized as the official code does."""
        if tuple(grid) == tuple(self.base_grid):
            return self.pos_embed
        base_rows, base_cols = self.base_grid
        table = self.pos_embed[:, 1:].reshape(1, base_rows, base_cols, -1).permute(0, 3, 1, 2)  # (1, D, rows, cols)
        # The +0.1 makes floor(base * scale) the wanted size; the kernel samples with this scale, not size / base.
        # (DINO passes the width's factor for the rows; the same on the square crops Harmony uses.)
        table = F.interpolate(table, scale_factor=((grid[0] + 0.1) / base_rows, (grid[1] + 0.1) / base_cols),
                              mode="bicubic", align_corners=False)
        patches = table.permute(0, 2, 3, 1).flatten(1, 2)  # (1, rows*cols, D)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def embed(self, images, patch_mask=None, keep_indices=None):
        """Tokens before the blocks: (B, 1 + N', D), CLS first (see `forward`)."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        tokens = self.patch_embed(images)  # (B, N, D)
        if patch_mask is not None:
            tokens = torch.where(patch_mask.flatten(1)[..., None], self.mask_token.to(tokens.dtype), tokens)
        positions = self.position_embedding(grid)
        tokens = tokens + positions[:, 1:]
        if keep_indices is not None:
            tokens = torch.gather(tokens, 1, keep_indices[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, N', D)
        cls = (self.cls_token + positions[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward(self, images, patch_mask=None, keep_indices=None):
        """All tokens after the final norm: (B, 1 + N', D), CLS first.

        images: (B, 3, H, W). patch_mask: (B, H/p, W/p) bool, True = replace by mask_token (iBOT).
        keep_indices: (B, N') patch indices to keep (MAE); the others are dropped.
        """
        return self.norm(run_blocks(self.blocks, self.embed(images, patch_mask, keep_indices), self.grad_checkpointing))

    def forward_with_attention(self, images):
        """(all tokens after the final norm (B, 1 + N, D), the CLS token's attention to each patch averaged over every
        layer and head (B, N)): the score A-CLIP and DetailCLIP mask by, `attn.mean(0)[:, :, 0, 1:].mean(1)`."""
        tokens, maps = self.embed(images), []
        for block in self.blocks:
            attention, normed = block.attn, block.norm1(tokens)
            batch, length, width = normed.shape
            qkv = attention.qkv(normed).reshape(batch, length, 3, attention.num_heads, attention.head_dim)
            query = attention.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, heads, 1, head_dim): CLS only
            keys = attention.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, heads, 1 + N, head_dim)
            weights = (query * attention.scale @ keys.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, 1 + N)
            maps.append(weights[:, :, 0, 1:].mean(dim=1))  # (B, N)
            tokens = block(tokens)
        return self.norm(tokens), torch.stack(maps).mean(dim=0)

    def embed_tokens(self, tokens):
        """CLIP image embedding (not normalized) of the tokens `forward` returned: pooled, projected, (B, clip_dim)."""
        return pool_tokens(tokens, self.pooling, getattr(self, "attention_pool", None)) @ self.contrastive_projection

    def embed_image(self, images, keep_indices=None):
        """CLIP image embedding (not normalized), (B, clip_dim); keep_indices: the patches kept (FLIP), or all."""
        return self.embed_tokens(self.forward(images, keep_indices=keep_indices))

def export_timm_state_dict(vit):
    """The image tower's weights under timm's names (for `vit_<size>_patch16_224`, num_classes=0)."""
    return {name: tensor for name, tensor in vit.state_dict().items() if not name.startswith(NOT_IN_TIMM)}
