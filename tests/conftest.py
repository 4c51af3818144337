import os

# No test touches a model hub or the network; keep runs quiet and single-threaded per process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Tiny LLM (small tokenizer), CLIP and SigLIP written to disk once per session."""
    from llava_tiny.testing.tiny import make_tiny_parts

    return make_tiny_parts(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def llama2_llm(tmp_path_factory):
    """A tiny LLM with the exact Llama-2/TinyLlama tokenizer (32k vocabulary)."""
    from llava_tiny.testing.tiny import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("llama2") / "llm"), tokenizer="llama2", hidden_size=32)
