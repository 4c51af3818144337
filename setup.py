"""llava-tiny: LLaVA-1.5-style training for small vision-language models."""
from setuptools import find_packages, setup

# torch is pinned by the install scripts (scripts/setup_env.sh installs the CPU wheel first);
# a range here keeps pip from replacing an installed CUDA or CPU build.
setup(
    name="llava-tiny",
    version="0.1.0",
    description="Fine-tune small LLaVA-style vision-language models (TinyLlama + CLIP/SigLIP).",
    python_requires=">=3.10",
    packages=find_packages(include=["llava_tiny*", "data_tools*", "eval*", "bench*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "pillow",
        "numpy",
        "tqdm",
        "matplotlib",
        "imagehash",
        "pyarrow",
    ],
    extras_require={
        "train": ["deepspeed>=0.15", "peft>=0.13", "bitsandbytes>=0.45"],
        "eval": ["pycocoevalcap"],
        "flash": ["flash-attn"],
        "wandb": ["wandb"],
        # The OpenAI-compatible API and the web chat (llava_tiny.serve); `openai` is the web chat's
        # client for --api-url.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "gradio>=5", "openai>=1.0", "httpx"],
        # selenium drives the system Chromium in the web chat test (no browser download here); trl is the
        # DPO tests' oracle (tests/test_dpo_loss.py); schemathesis draws requests from OpenAI's API document
        # and jsonschema checks the answers against it (tests/test_serve_openapi.py); pytest-xdist runs the
        # suite's files on both cores (scripts/test.sh).
        "dev": ["pytest", "pytest-xdist>=3.6,<4", "hypothesis", "pytest-timeout", "selenium", "trl>=1.16,<2", "schemathesis>=4.32,<5",
                "jsonschema>=4.18"],
    },
)
