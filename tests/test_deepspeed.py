"""DeepSpeed ZeRO-2/3 over two CPU processes (gloo), launched like the GPU scripts: trains, evaluates on a
set that alternates image and text-only records (one rank's whole eval batch is text-only: under ZeRO-3 a
rank that skips the vision tower while the other runs it aborts gloo and hangs NCCL), saves, the checkpoint
equals DeepSpeed's own consolidated weights, reloads and generates. Peer: DeepSpeed itself."""
import glob
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from llava_tiny.conversation import tokenize_prompt
from llava_tiny.model.builder import load_pretrained_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_alternating_eval_set(data: dict, path) -> str:
    """Image, text-only, image, ... : with batch size 1 on two ranks, rank 0 gets every image record and rank 1
    every text-only one (batches are dealt round-robin)."""
    records = json.load(open(data["data_path"]))
    images = [r for r in records if "image" in r]
    texts = [r for r in records if "image" not in r]
    with open(path, "w") as f:
        json.dump([r for pair in zip(images, texts) for r in pair], f)
    return str(path)


def launch(tiny_parts, data, out, zero, *flags):
    """The seed users' command line (tiny local models instead of hub ids), two CPU processes."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "llava_tiny/train/train_mem.py",
           "--deepspeed", f"zero_configs/{zero}.json", "--model_name_or_path", tiny_parts["llm"], "--version", "v1",
           "--data_path", data["data_path"], "--image_folder", data["image_folder"],
           "--vision_tower", tiny_parts["clip"], "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
           "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
           "--group_by_modality_length", "True", "--bf16", "True", "--output_dir", str(out),
           "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
           "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "steps",
           "--save_steps", "3", "--save_total_limit", "1", "--learning_rate", "2e-3", "--weight_decay", "0.",
           "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
           "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "1",
           "--lazy_preprocess", "True", "--report_to", "wandb", *flags]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    port = cmd[cmd.index("--master_port") + 1]  # DeepSpeed's CPU all-reduce buffers (69 MB a rank) are gone
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return result


def _deepspeed_weights(checkpoint_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir)


# Full fine-tuning under ZeRO-2 holds whole parameters on every rank (nothing to consolidate, no mixed-batch
# hang): it runs in tests/faults/test_multiprocess.py; here the three combinations that partition something.
@pytest.mark.parametrize("mode, zero", [("lora", "zero2"), ("lora", "zero3"), ("full", "zero3")])
def test_two_process_training_saves_what_it_trained(tmp_path, tiny_parts, color_data, zero, mode):
    flags = ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3"] \
        if mode == "lora" else []
    out = tmp_path / "out"
    eval_data = write_alternating_eval_set(color_data, tmp_path / "eval.json")
    launch(tiny_parts, color_data, out, zero, *flags, "--eval_data_path", eval_data, "--evaluation_strategy",
           "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "1")
    evals = [h for h in json.load(open(out / "trainer_state.json"))["log_history"] if "eval_loss" in h]
    assert evals[0]["step"] == 2 and all(math.isfinite(h["eval_loss"]) for h in evals)

    loaded = load_pretrained_model(str(out), merge_lora=False)
    assert loaded.kind == mode
    # The saved checkpoint equals DeepSpeed's own consolidation of the engine's shards.
    reference = _deepspeed_weights(str(out / "checkpoint-3"))
    saved = {k: v for k, v in loaded.model.state_dict().items()}
    compared = 0
    for name, tensor in reference.items():
        key = name if name in saved else name.replace(".default", "")
        if key not in saved and mode == "lora":
            continue  # frozen base weights are not part of a LoRA checkpoint's trained state
        assert tensor.numel() > 0, f"{name} saved empty"
        torch.testing.assert_close(saved[key].float(), tensor.float(), atol=1e-6, rtol=1e-5)
        compared += 1
    assert compared >= (20 if mode == "lora" else 40)

    ids = torch.tensor([tokenize_prompt("What color is the image?", loaded.tokenizer, loaded.template, 16)])
    generated = loaded.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] < generated.shape[1] <= ids.shape[1] + 3


@pytest.mark.parametrize("script, extra", [
    ("finetune_lora.sh", ["--lora_r", "4", "--lora_alpha", "8"]),
    ("finetune_qlora.sh", ["--optim", "adamw_torch"]),  # paged 8-bit AdamW needs CUDA
])
def test_training_scripts_run_with_tiny_models(tmp_path, tiny_parts, color_data, script, extra):
    env = dict(os.environ, LLM=tiny_parts["llm"], VISION_TOWER=tiny_parts["clip"], PROJECTOR="",
               DATA=color_data["data_path"], IMAGES=color_data["image_folder"], OUT=str(tmp_path / "out"),
               NUM_GPUS="1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                             "--dataloader_num_workers", "0", *extra],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert load_pretrained_model(str(tmp_path / "out")).kind == "lora"
