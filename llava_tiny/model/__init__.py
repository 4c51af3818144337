"""The model: `LlavaTinyConfig` / `LlavaTinyForCausalLM` (importing this package registers the
`llava_tiny` model type with transformers' Auto classes), assembly and loading (`builder`), and
the checkpoint kinds (`checkpoints`)."""
from .modeling import LlavaTinyConfig, LlavaTinyForCausalLM, unwrap_model

__all__ = ["LlavaTinyConfig", "LlavaTinyForCausalLM", "unwrap_model"]
