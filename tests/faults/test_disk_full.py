"""Disk full while saving a checkpoint: a clear error naming the path and the bytes needed, the previous
checkpoint intact, and the same command resumes once there is space.

The filesystem is a real 64 MiB tmpfs, filled to the last byte right after checkpoint-1 is written.
Where mounting is not permitted (not root), the write of checkpoint-2 raises ENOSPC instead."""
import contextlib
import errno
import os
import re
import subprocess

import pytest

from faultlib import color_samples, one_thread, text_samples, train_argv, train_in_process, trainer_state, write_samples
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.train import recipes
from llava_tiny.train.run_dir import DiskFullError
from llava_tiny.train.trainer import LlavaTrainer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@contextlib.contextmanager
def small_filesystem(path, size="64m"):
    """A tmpfs mounted at `path`, or None where mounting is not permitted."""
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(filesystem) -> None:
    """Write a ballast file until the filesystem refuses more (a real ENOSPC)."""
    # Unbuffered: a buffered file would raise ENOSPC again when it is closed, flushing what was left.
    with open(os.path.join(filesystem, "ballast"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_disk_full_while_saving_names_path_and_bytes_and_keeps_the_previous_checkpoint(tmp_path, tiny_parts,
                                                                                      monkeypatch):
    data = write_samples(tmp_path, color_samples(tmp_path, 6) + text_samples(2))
    with small_filesystem(tmp_path / "fs") as filesystem:
        out = (filesystem or tmp_path) / "out"
        argv = train_argv(tiny_parts, data, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
        real_checkpoint, real_save = LlavaTrainer._save_checkpoint, recipes.save_checkpoint

        def no_space_for_checkpoint_2(kind, model, processor, output_dir, **kwargs):
            if "checkpoint-2" in output_dir:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir)
            return real_save(kind, model, processor, output_dir, **kwargs)

        def disk_fills_up_after_checkpoint_1(self, model, trial):
            real_checkpoint(self, model, trial)
            if self.state.global_step == 1:
                if filesystem:
                    fill(filesystem)
                else:
                    monkeypatch.setattr(recipes, "save_checkpoint", no_space_for_checkpoint_2)

        monkeypatch.setattr(LlavaTrainer, "_save_checkpoint", disk_fills_up_after_checkpoint_1)
        with pytest.raises(DiskFullError) as err:
            train_in_process(argv)
        message = str(err.value)
        assert f"disk full while saving to {out / 'tmp-checkpoint-2'}" in message
        assert f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact" in message
        assert "rerun the same command to resume" in message
        needed = int(re.search(r"about ([\d,]+) bytes needed", message).group(1).replace(",", ""))
        written = sum(os.path.getsize(out / "checkpoint-1" / name) for name in ("model.safetensors", "optimizer.pt"))
        assert 0.8 * written <= needed <= 1.25 * written, (needed, written)

        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # partial removed
        assert trainer_state(out / "checkpoint-1")["global_step"] == 1
        assert load_pretrained_model(str(out / "checkpoint-1")).kind == "full"

        monkeypatch.setattr(LlavaTrainer, "_save_checkpoint", real_checkpoint)
        monkeypatch.setattr(recipes, "save_checkpoint", real_save)
        if filesystem:
            os.remove(os.path.join(filesystem, "ballast"))
        train_in_process(argv)  # space again: the same command resumes from checkpoint-1 and finishes
        assert trainer_state(out)["global_step"] == 3
