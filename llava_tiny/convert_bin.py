"""Convert pickled PyTorch weights (`.bin`, `.pt`, `.pth`) to safetensors, safely.

    python scripts/convert_bin_to_safetensors.py checkpoints/clip-vit-large-patch14-336 converted/clip
    python scripts/convert_bin_to_safetensors.py old-run/mm_projector.bin converted/projector

Recent PyTorch refuses to `torch.load` old checkpoints by default (CVE-2025-32434: a pickle can
run arbitrary code when loaded). This script loads ONLY with
`torch.load(..., weights_only=True, map_location="cpu")`, which admits tensors and plain
containers; a file that needs anything else is refused with a message, never loaded unsafely.

Renames: `pytorch_model.bin` -> `model.safetensors`, `pytorch_model-0000k-of-0000n.bin` ->
`model-0000k-of-0000n.safetensors` (and the shard index), any other `NAME.bin` ->
`NAME.safetensors` (`mm_projector.bin`, `adapter_model.bin`, `non_lora_trainables.bin`). Config,
tokenizer and preprocessor files next to the weights are copied. Trainer state (`training_args.bin`,
`optimizer.pt`, ...) is skipped: it is not weights. Key names are kept as they are. The output
folder appears only when every file converted.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
# Written by the HF Trainer next to the weights; pickled objects, not tensors, and not needed to load a model.
TRAINER_STATE = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state")
COPY_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja")
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_INDEX = "model.safetensors.index.json"


class UnsafeCheckpointError(ValueError):
    """A pickle that needs more than tensors and plain containers to load (possibly malicious)."""


def safetensors_name(name: str) -> str:
    """The safetensors file name that transformers/peft/this project look for in place of `name`."""
    stem = name[: -len(os.path.splitext(name)[1])]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def is_trainer_state(name: str) -> bool:
    return any(name == s or name.startswith(s) for s in TRAINER_STATE)


def load_state_dict_safely(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a pickled checkpoint, loaded with `weights_only=True` only.

    Accepts a flat {name: tensor} dict, or one wrapped as {"state_dict"|"model"|"module": {...}}.
    """
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False; keep only the reason (what the pickle asked for).
        text = str(err)
        marker = "WeightsUnpickler error:"
        reason = text.split(marker, 1)[1].strip().splitlines()[0].split(" Please use")[0] if marker in text else ""
        raise UnsafeCheckpointError(
            f"{path}: refused; it needs more than tensors to unpickle ({reason or 'not a weights-only pickle'}). "
            "Loading it would run whatever code the file names (CVE-2025-32434), so only "
            "torch.load(weights_only=True) is used. Only if you trust where the file came from, load it "
            "yourself and save its state dict") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "module"):  # e.g. {"state_dict": {...}, "epoch": 3}
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds {type(obj).__name__}, not a state dict ({{name: tensor}})")
    other = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise ValueError(f"{path}: entries that are not tensors cannot be stored as safetensors: {other[:5]}")
    return dict(obj)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): later aliases get their own copy."""
    storages: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in storages:
            tensor = tensor.clone()
        elif tensor.numel():
            storages.add(pointer)
        out[name] = tensor.contiguous()
    return out


def _rewrite_index(src: str, dst: str) -> None:
    with open(src) as f:
        index = json.load(f)
    index["weight_map"] = {k: safetensors_name(v) for k, v in index.get("weight_map", {}).items()}
    with open(dst, "w") as f:
        json.dump(index, f, indent=2)


def convert(source: str, out_dir: str) -> list[str]:
    """Convert the weights in `source` (a folder or one file) into `out_dir`; return the files written.

    `out_dir` must not exist or be empty; it is filled only when every weight file converted.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new folder")
    if os.path.isdir(source):
        folder, names = source, sorted(os.listdir(source))
        weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and not is_trainer_state(n)]
    elif os.path.isfile(source):
        folder = os.path.dirname(source) or "."
        # One shard alone cannot use the folder's shard index: copy the other files, not the index.
        names = [n for n in sorted(os.listdir(folder)) if n != BIN_INDEX]
        weights = [os.path.basename(source)]
    else:
        raise FileNotFoundError(f"{source} does not exist")
    if not weights:
        raise FileNotFoundError(f"{source} holds no {'/'.join(WEIGHT_SUFFIXES)} weight files")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        written = []
        for name in weights:
            tensors = _unshare(load_state_dict_safely(os.path.join(folder, name)))
            save_file(tensors, os.path.join(staging, safetensors_name(name)), metadata={"format": "pt"})
            written.append(safetensors_name(name))
            del tensors
        for name in names:
            path = os.path.join(folder, name)
            if name == BIN_INDEX:
                _rewrite_index(path, os.path.join(staging, SAFE_INDEX))
                written.append(SAFE_INDEX)
            elif name.endswith(COPY_SUFFIXES) and os.path.isfile(path):
                shutil.copy2(path, staging)
                written.append(name)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint folder or one .bin/.pt/.pth file")
    parser.add_argument("out_dir", help="new (or empty) folder for the safetensors files")
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out_dir)
    except (UnsafeCheckpointError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = [n for n in os.listdir(args.source) if is_trainer_state(n)] if os.path.isdir(args.source) else []
    print(f"wrote {args.out_dir}: {', '.join(written)}")
    if skipped:
        print(f"skipped trainer state (not weights): {', '.join(sorted(skipped))}")
    return 0

