"""`train.py` asking for flash attention (falls back to SDPA with one log line), as LLaVA's train_mem.py.

    deepspeed llava_tiny/train/train_mem.py --deepspeed zero_configs/zero3.json ...
"""
import os
import sys

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from llava_tiny.train.train import train  # noqa: E402

if __name__ == "__main__":
    train(attn_implementation="flash_attention_2")
