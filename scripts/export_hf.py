"""Export any checkpoint to the stock transformers LLaVA layout (see llava_tiny/export.py, or --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llava_tiny.export import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
