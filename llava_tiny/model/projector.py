"""Projector builders: vision features -> language-model embeddings (`--mm_projector_type`)."""
from __future__ import annotations

import re

from torch import nn
from transformers.activations import ACT2FN


class MlpProjector(nn.Module):
    """`linear_1`, `act`, `linear_2`, ... `linear_N`: with N=2 this is exactly the stock
    `LlavaMultiModalProjector` (same parameter names), so stock transformers loads it."""

    def __init__(self, in_features: int, out_features: int, depth: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = ACT2FN[act]
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(out_features, out_features, bias=bias))

    def forward(self, features):
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x


class IdentityProjector(nn.Module):
    def forward(self, features):
        return features


_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """0 for `identity`, 1 for `linear`, N for `mlp{N}x_gelu`; a clear error otherwise."""
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    match = _MLP.match(projector_type)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(f"unknown mm_projector_type {projector_type!r}; expected 'linear', 'identity' or 'mlp{{N}}x_gelu' (N>=1)")


def build_projector(projector_type: str, vision_hidden_size: int, text_hidden_size: int, bias: bool = True) -> nn.Module:
    """Build the projector named by `projector_type` ('linear', 'mlp{N}x_gelu', 'identity')."""
    depth = projector_depth(projector_type)
    if depth == 0:
        if vision_hidden_size != text_hidden_size:
            raise ValueError(f"mm_projector_type 'identity' needs equal hidden sizes; vision tower has "
                             f"{vision_hidden_size}, language model has {text_hidden_size}")
        return IdentityProjector()
    return MlpProjector(vision_hidden_size, text_hidden_size, depth, bias=bias)


def is_stock_llava_projector(projector_type: str) -> bool:
    """Stock `LlavaForConditionalGeneration` can express only the 2-layer GELU MLP."""
    return projector_type == "mlp2x_gelu"
