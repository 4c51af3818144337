"""Quiet, honest logs: two dependency warnings that say nothing about a llava-tiny run are filtered
(exactly those messages, nothing else), and DeepSpeed's one-time CPU build is announced.

- transformers 5 names `CLIPImageProcessor`/`SiglipImageProcessor` after its torchvision backend;
  without torchvision it "falls back" to the PIL processor (`...ImageProcessorPil`), which is the
  one this project means to use (no torchvision wheel matches every torch build), so the warning
  on every run is noise.
- bitsandbytes, on a CPU with AVX512-BF16, tries at import to fetch an optional fused 4-bit kernel
  from the Hugging Face hub through the `kernels` package; without it (or offline) its own CPU
  kernels are used, which is what runs anyway.

Imported by `llava_tiny/__init__.py`, so any entry point of the project installs the filters
before transformers or bitsandbytes can log.
"""
from __future__ import annotations

import logging
import os
import sys

# logger name -> the start of the one message filtered on it
FILTERED = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
SHM_OP = "deepspeed_shm_comm"


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_dependency_warnings() -> None:
    """Filter the two messages of `FILTERED` on the loggers that emit them (idempotent)."""
    for name, text in FILTERED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


def announce_deepspeed_cpu_build() -> None:
    """Say so before DeepSpeed compiles its CPU shared-memory comm op (once per cache folder, 1-2 min):
    otherwise the first CPU run sits silent while a C++ compiler runs. Printed by local rank 0 only."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    # DeepSpeed's own condition (deepspeed/comm/torch.py, build_shm_op), and not pre-built at install
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(SHM_OP) or installed_ops.get(SHM_OP):
        return
    folder = _get_build_directory(SHM_OP, verbose=False)
    if not os.path.isfile(os.path.join(folder, f"{SHM_OP}.so")):
        print(f"building DeepSpeed's CPU communication op once, 1-2 min (cached in {folder}; "
              "set TORCH_EXTENSIONS_DIR to keep it elsewhere)", file=sys.stderr, flush=True)
