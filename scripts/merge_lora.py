"""Merge a LoRA checkpoint into its base model (see llava_tiny/export.py, or --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llava_tiny.export import merge_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(merge_main())
