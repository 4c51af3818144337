"""DPO under DeepSpeed ZeRO-2/3 over two CPU processes (gloo), launched like the GPU scripts: LoRA
(reference = adapters off) and full (a frozen reference partitioned like the policy); the checkpoint
equals DeepSpeed's own consolidation and loads in load_pretrained_model, eval.generate, merge_lora
and the chat CLI (the server's loader); scripts/dpo.sh runs. The eval pairs are ordered image, text, text,
image at batch size 1, so that under ZeRO-3 one rank's whole batch is text-only while the other's holds an
image, both in the reference log-probs (contiguous halves) and in evaluation (batches dealt round-robin).
Peer: DeepSpeed itself."""
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dpo_data import write_preference_dataset
from llava_tiny.model.builder import load_pretrained_model
from test_deepspeed import ROOT, _deepspeed_weights, _free_port

pytestmark = pytest.mark.slow
LN2 = math.log(2)
LORA = ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--freeze_mm_mlp_adapter", "True"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    path = write_preference_dataset(root, n=8, text_only=2, seed=3)
    records = json.load(open(path))
    images, texts = [r for r in records if "image" in r], [r for r in records if "image" not in r]
    with open(root / "eval-pairs.json", "w") as f:
        json.dump([images[0], texts[0], texts[1], images[1]], f)
    return {"data_path": path, "eval_data_path": str(root / "eval-pairs.json"), "image_folder": str(root)}


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def launch_dpo(tiny_parts, data, out, zero, *flags):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "llava_tiny/train/train_dpo.py",
           "--deepspeed", f"zero_configs/{zero}.json", "--model_name_or_path", tiny_parts["llm"], "--version", "v1",
           "--vision_tower", tiny_parts["clip"], "--data_path", data["data_path"], "--image_folder",
           data["image_folder"], "--eval_data_path", data["eval_data_path"], "--eval_strategy", "steps", "--eval_steps", "3",
           "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2",
           "--per_device_eval_batch_size", "1", "--save_strategy", "steps", "--save_steps", "3", "--learning_rate", "5e-3",
           "--logging_steps", "1", "--bf16", "True", "--gradient_checkpointing", "True",
           "--dataloader_num_workers", "0", "--report_to", "none", *flags]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]


# Full DPO under ZeRO-2 keeps whole parameters and a whole frozen reference on every rank, as one process does
# (tests/test_dpo_train.py): here the three combinations that partition something.
@pytest.mark.parametrize("mode, zero", [("lora", "zero2"), ("lora", "zero3"), ("full", "zero3")])
def test_two_process_dpo_trains_and_saves_what_it_trained(tmp_path, tiny_parts, pairs, zero, mode):
    out = tmp_path / "out"
    history = launch_dpo(tiny_parts, pairs, out, zero, *(LORA if mode == "lora" else []))
    logs = [h for h in history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(LN2, abs=1e-4) and logs[0]["rewards/margins"] == 0.0
    assert all(name in logs[-1] for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                             "logps/chosen", "logps/rejected"))
    assert [h["eval_pairs"] for h in history if "eval_loss" in h] == [4]  # both processes' pairs, once each

    loaded = load_pretrained_model(str(out), merge_lora=False)
    assert loaded.kind == mode
    consolidated = _deepspeed_weights(str(out / "checkpoint-3"))  # DeepSpeed's own view of the engine's shards
    saved = loaded.model.state_dict()
    keys = {name: name if name in saved else name.replace(".default", "") for name in consolidated}
    found = [name for name, key in keys.items() if key in saved]  # a LoRA folder leaves the frozen base out
    assert len(found) >= 16 and (mode == "lora" or len(found) == len(consolidated))
    for name in found:
        assert consolidated[name].numel() > 0, f"{name} saved empty"
        torch.testing.assert_close(saved[keys[name]].float(), consolidated[name].float(), atol=1e-6, rtol=1e-5)


def test_dpo_checkpoints_load_in_generate_merge_and_the_chat(tmp_path, tiny_parts, pairs):
    """scripts/dpo.sh (ZeRO-3, LoRA), then every loader on its output."""
    from eval import generate
    from llava_tiny import export
    from llava_tiny.serve import cli

    out = tmp_path / "dpo"
    env = dict(_env(), MODEL="", LLM=tiny_parts["llm"], VISION_TOWER=tiny_parts["clip"], PROJECTOR="",
               DATA=pairs["data_path"], IMAGES=pairs["image_folder"], OUT=str(out), NUM_GPUS="1",
               MASTER_PORT=str(_free_port()))
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "dpo.sh"), "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0",
                             "--lora_r", "4", "--lora_alpha", "8"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert load_pretrained_model(str(out)).kind == "lora"

    preds = tmp_path / "preds.jsonl"
    questions = os.path.join(pairs["image_folder"], "data.json")  # the SFT samples the pairs were made from
    assert generate.main(["--model-path", str(out), "--data", questions, "--image-folder", pairs["image_folder"],
                          "--out", str(preds), "--max-new-tokens", "3"]) == 0
    assert len(preds.read_text().splitlines()) == 10
    assert export.merge_main(["--model-path", str(out), "--save-path", str(tmp_path / "merged")]) == 0
    assert load_pretrained_model(str(tmp_path / "merged")).kind == "full"
    answer = io.StringIO()
    image = os.path.join(pairs["image_folder"], "images", "0.png")
    assert cli.main(["--model-path", str(out), "--image-file", image, "--query", "What color is the image?",
                     "--max-new-tokens", "3"], stdout=answer) == 0
    assert answer.getvalue().strip() != ""
