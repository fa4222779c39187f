"""Projection heads for self-distillation: MLP, L2-normalized bottleneck, weight-normalized output.

iBOT head (docs/methods/harmony.md 3.2): D -> 2048 -> 2048 -> 256, GELU, then 256 -> 8192; one last layer is
shared by CLS and patch tokens. Text-distillation head (3.6): 512 -> 1024 -> 256, then -> 2048.
The output layer's norm (weight_g) is fixed at 1 and frozen, as `norm_last_layer=True`.
"""

import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DistillationHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dims, bottleneck_dim=256):
        super().__init__()
        layers, previous = [], in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(previous, hidden), nn.GELU()]
            previous = hidden
        layers.append(nn.Linear(previous, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def bottleneck(self, tokens):
        """(..., in_dim) -> (..., bottleneck_dim), L2-normalized: the last layer's input."""
        return F.normalize(self.mlp(tokens), dim=-1)

    def forward(self, tokens):
        """(..., in_dim) -> (..., out_dim) logits. The last layer is linear without bias, so the mean of the
        logits is the last layer of the mean bottleneck."""
        return self.last_layer(self.bottleneck(tokens))


def ibot_head(embed_dim, out_dim=8192, hidden_dim=2048, bottleneck_dim=256):
    return DistillationHead(embed_dim, out_dim, (hidden_dim, hidden_dim), bottleneck_dim)


def text_distillation_head(width=512, out_dim=2048, hidden_dim=1024, bottleneck_dim=256):
    return DistillationHead(width, out_dim, (hidden_dim,), bottleneck_dim)
