"""The model: `LlavaTinyConfig` / `LlavaTinyForCausalLM` (importing this package registers the
`llava_tiny` model type with transformers' Auto classes), assembly and loading (`builder`), and
the checkpoint kinds (`checkpoints`)."""
from .modeling import LlavaTinyConfig, LlavaTinyForCausalLM, image_seq_length, language_model, unwrap_model

__all__ = ["LlavaTinyConfig", "LlavaTinyForCausalLM", "image_seq_length", "language_model", "unwrap_model"]
