"""Projectors: vision features -> language-model embeddings (`--mm_projector_type`).

A projector type is one `@register_projector(pattern)` builder here: `pattern` is a regular expression its
names match (`mlp(\\d+)x_gelu`), the builder makes the module from the name's match and the two hidden sizes,
and `image_tokens` (optional) says how many features per image it gives back for the tower's count, for a
projector that pools or merges patches. The model config's `image_seq_length`, the placeholder count the data
expands `<image>` to, follows from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class ProjectorType:
    pattern: re.Pattern
    build: Callable[..., nn.Module]  # (match, vision_hidden_size, text_hidden_size, bias) -> module
    image_tokens: Callable[[int], int]  # the tower's features per image -> the projector's


PROJECTORS: list[ProjectorType] = []


def register_projector(pattern: str, image_tokens: Callable[[int], int] = lambda features: features):
    """Register the decorated builder for the `--mm_projector_type` names that fully match `pattern`."""
    def add(build):
        PROJECTORS.append(ProjectorType(re.compile(pattern), build, image_tokens))
        return build
    return add


def projector_type(name: str) -> tuple[ProjectorType, re.Match]:
    """The registered type a name belongs to (and the name's match), or a clear error listing the known ones."""
    for projector in PROJECTORS:
        match = projector.pattern.fullmatch(name)
        if match:
            return projector, match
    known = ", ".join(repr(p.pattern.pattern) for p in PROJECTORS)
    raise ValueError(f"unknown mm_projector_type {name!r}; expected a name matching one of {known}")


def build_projector(name: str, vision_hidden_size: int, text_hidden_size: int, bias: bool = True) -> nn.Module:
    """Build the projector named `name` (e.g. 'linear', 'mlp2x_gelu', 'identity')."""
    projector, match = projector_type(name)
    return projector.build(match, vision_hidden_size, text_hidden_size, bias)


def projector_image_tokens(name: str, tower_tokens: int) -> int:
    """Image tokens per image after the projector named `name`, for a tower that gives `tower_tokens`."""
    return projector_type(name)[0].image_tokens(tower_tokens)


def is_stock_llava_projector(name: str) -> bool:
    """Stock `LlavaForConditionalGeneration` can express only the 2-layer GELU MLP."""
    return name == "mlp2x_gelu"


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


@register_projector(r"mlp([1-9]\d*)x_gelu")
def mlp_projector(match, vision_hidden_size, text_hidden_size, bias):
    return MlpProjector(vision_hidden_size, text_hidden_size, int(match.group(1)), bias=bias)


@register_projector(r"linear")
def linear_projector(match, vision_hidden_size, text_hidden_size, bias):
    return MlpProjector(vision_hidden_size, text_hidden_size, 1, bias=bias)


@register_projector(r"identity")
def identity_projector(match, vision_hidden_size, text_hidden_size, bias):
    if vision_hidden_size != text_hidden_size:
        raise ValueError(f"mm_projector_type 'identity' needs equal hidden sizes; vision tower has "
                         f"{vision_hidden_size}, language model has {text_hidden_size}")
    return IdentityProjector()
