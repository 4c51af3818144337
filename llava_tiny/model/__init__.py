"""The model: `LlavaTinyConfig` / `LlavaTinyForCausalLM` (importing this package registers the
`llava_tiny` model type with transformers' Auto classes, and the built-in checkpoint kinds of
`checkpoint_kinds` with the resolver in `checkpoints`), assembly and loading (`builder`)."""
from . import checkpoint_kinds  # noqa: F401  (registers the built-in checkpoint kinds)
from .modeling import LlavaTinyConfig, LlavaTinyForCausalLM, image_seq_length, language_model, unwrap_model

__all__ = ["LlavaTinyConfig", "LlavaTinyForCausalLM", "image_seq_length", "language_model", "unwrap_model"]
