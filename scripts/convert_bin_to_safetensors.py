"""Convert pickled weights to safetensors, safely (see llava_tiny/convert_bin.py, or --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llava_tiny.convert_bin import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
