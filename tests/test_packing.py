"""The training fast path: packed batches, chunked cross-entropy, a frozen tower without autograd.

Each speed-up must leave the arithmetic alone: a packed batch's summed loss (and its gradients)
equals its samples' losses computed one by one, image samples included; the chunked loss equals
the standard one.
"""
import contextlib
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import required_flags
from llava_tiny.model.builder import assemble_model
from llava_tiny.model.lora import apply_lora
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import parse_args
from llava_tiny.train.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from llava_tiny.train.fast_path import chunked_causal_lm_loss, run_frozen_tower_without_grad
from llava_tiny.train.packing import PACKED_SDPA, PackingCollator, make_data_collator, use_packed_attention
from llava_tiny.train.recipes import FullFinetune
from llava_tiny.train.trainer import LlavaTrainer, ModalityLengthGroupedSampler


def write_mixed_dataset(root, seed=0):
    """Image samples with distinct images and different lengths (one multi-turn), and text-only ones."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    words = "red green blue square circle left right top bottom what color shape is the image of".split()
    samples = []
    for i in range(5):
        pixels = bytes(rng.randrange(256) for _ in range(40 * (40 + 8 * i) * 3))
        Image.frombytes("RGB", (40, 40 + 8 * i), pixels).save(os.path.join(root, "images", f"{i}.png"))
        turns = [{"from": "human", "value": "<image>\n" + " ".join(rng.choices(words, k=3 + 2 * i)) + "?"},
                 {"from": "gpt", "value": " ".join(rng.choices(words, k=1 + 3 * i))}]
        if i == 3:
            turns += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a circle on the left"}]
        samples.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": turns})
    for i in range(3):
        samples.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": " ".join(rng.choices(words, k=4 + 3 * i))},
            {"from": "gpt", "value": " ".join(rng.choices(words, k=2 + 5 * i))}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return {"data_path": path, "image_folder": str(root)}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    return write_mixed_dataset(str(tmp_path_factory.mktemp("mixed")))


@pytest.fixture(scope="module")
def tiny(tiny_parts, mixed_data):
    """A float32 tiny LLaVA (LLM, projector trainable; tower frozen) and the mixed samples, tokenized."""
    torch.manual_seed(0)
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.float32)
    loaded.model.model.vision_tower.requires_grad_(False)
    dataset = LazySupervisedDataset(mixed_data["data_path"], loaded.tokenizer, loaded.image_processor, "llava_v1",
                                    loaded.model.config.image_seq_length, image_folder=mixed_data["image_folder"])
    items = [dataset[i] for i in range(len(dataset))]
    assert sum("pixel_values" in item for item in items) == 5 and len({len(i["input_ids"]) for i in items}) > 4
    return loaded, items


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def summed_loss(model, batch):
    """Sum of the token losses (transformers divides the sum by num_items_in_batch)."""
    return model(**model_inputs(batch), num_items_in_batch=1).loss


def one_by_one(model, items, pad_token_id):
    return sum(summed_loss(model, DataCollatorForSupervisedDataset(pad_token_id)([item])) for item in items)


def gradients(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@contextlib.contextmanager
def attention(model, implementation):
    """Run the language model with `implementation`: 'sdpa' (transformers turns the position
    restarts into a block-diagonal mask) or the project's per-sample 'sdpa_packed'."""
    config = model.model.language_model.config
    if implementation == PACKED_SDPA:
        use_packed_attention(model)
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


ATTENTION = ["sdpa", PACKED_SDPA]


@pytest.mark.parametrize("implementation", ATTENTION)
@pytest.mark.parametrize("picks", [[4, 0, 5, 1, 6, 2, 7, 3], [5, 6, 7]], ids=["mixed", "text-only"])
def test_packed_loss_and_gradients_equal_the_samples_one_by_one(tiny, implementation, picks):
    loaded, items = tiny
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    items = [items[i] for i in picks]
    model.train()
    expected = one_by_one(model, items, pad)
    expected.backward()
    expected_grads = gradients(model)
    batch = PackingCollator()(items)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(i["input_ids"]) for i in items))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        with attention(model, implementation):
            packed = summed_loss(model, batch)
            packed.backward()
    finally:
        hook.remove()
    packed_grads = gradients(model)
    assert seen == [int((batch["labels"][:, 1:] != -100).sum())]  # logits only where a token is supervised
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-6)
    assert packed_grads.keys() == expected_grads.keys() and any("projector" in n for n in packed_grads)
    for key in expected_grads:
        torch.testing.assert_close(packed_grads[key], expected_grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ATTENTION)
def test_packed_eval_loss_equals_the_samples_one_by_one(tiny, implementation):
    """In eval mode too (transformers would otherwise build a KV cache and drop packed detection)."""
    loaded, items = tiny
    loaded.model.eval()
    with torch.no_grad(), attention(loaded.model, implementation):
        expected = one_by_one(loaded.model, items, loaded.tokenizer.pad_token_id)
        packed = summed_loss(loaded.model, PackingCollator()(items))
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-6)


def test_the_equality_notices_attention_across_samples_and_swapped_images(tiny):
    """The checks above can fail: with a cache transformers drops packed detection, without its
    segments the packed attention sees the whole row, and images in the wrong order land in the
    wrong placeholders; each changes the loss."""
    loaded, items = tiny
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    model.eval()
    batch = PackingCollator()(items)
    with torch.no_grad():
        expected = one_by_one(model, items, pad)
        changed = [summed_loss(model, {**batch, "use_cache": True}),
                   summed_loss(model, {**batch, "pixel_values": batch["pixel_values"].flip(0)})]
        with attention(model, PACKED_SDPA):
            changed.append(summed_loss(model, {k: v for k, v in batch.items() if k != "packed_segments"}))
    for loss in changed:
        assert abs(loss - expected) > 1e-3


def test_packed_row_restarts_positions_and_masks_each_sample_start(tiny):
    loaded, items = tiny
    batch = PackingCollator()(items)
    start = 0
    for item, segment in zip(items, batch["packed_segments"][0]):
        n = len(item["input_ids"])
        assert segment == (start, start + n)
        assert batch["position_ids"][0, start:start + n].tolist() == list(range(n))
        assert batch["input_ids"][0, start:start + n].tolist() == item["input_ids"].tolist()
        assert batch["labels"][0, start] == -100 and item["labels"][0] == -100  # unchanged in the sample
        assert batch["labels"][0, start + 1:start + n].tolist() == item["labels"][1:].tolist()
        start += n
    assert start == batch["input_ids"].shape[1]
    keep = batch["logits_to_keep"][0]
    assert len(keep) == int((batch["labels"][0, 1:] != -100).sum()) and (batch["labels"][0, keep + 1] != -100).all()
    assert batch["shift_labels"][0].tolist() == batch["labels"][0, keep + 1].tolist()
    assert batch["use_cache"] is False and batch["sample_ids"] == [i["sample_id"] for i in items]
    assert isinstance(make_data_collator(0, False), DataCollatorForSupervisedDataset)


def test_packed_sdpa_attention_attends_within_each_sample_of_each_row():
    import torch.nn.functional as F

    from llava_tiny.train.packing import packed_sdpa_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    segments = [[(0, 4), (4, 9)], [(0, 1), (1, 6)]]  # the second row ends in 3 positions of padding
    out, _ = packed_sdpa_attention(module, query, key, value, None, packed_segments=segments)
    assert out.shape == (2, 9, 4, 8)
    for row, row_segments in enumerate(segments):
        for start, end in row_segments:
            q, k, v = (t[row:row + 1, :, start:end] for t in (query, key, value))
            alone = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                   is_causal=True)
            torch.testing.assert_close(out[row, start:end], alone[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    assert (out[1, 6:] == 0).all()


def test_packed_attention_is_refused_where_it_would_cross_samples_and_is_never_saved(tmp_path, tiny_parts):

    eager = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.float32)
    eager.model.model.language_model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="--packing needs attn_implementation 'sdpa' or 'flash_attention_2'"):
        use_packed_attention(eager.model)
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.float32)
    use_packed_attention(apply_lora(loaded.model, r=4, alpha=8))  # through the peft wrapper
    assert loaded.model.model.language_model.config._attn_implementation == PACKED_SDPA
    loaded.save_pretrained(str(tmp_path / "saved"))
    assert PACKED_SDPA not in (tmp_path / "saved" / "config.json").read_text()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_cross_entropy_equals_the_standard_loss_and_gradients(tiny, packed, num_items):
    loaded, items = tiny
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    model.train()
    batch = model_inputs(PackingCollator()(items) if packed else DataCollatorForSupervisedDataset(pad)(items))
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    standard = model(**batch, **extra).loss
    standard.backward()
    expected = gradients(model)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    vocab = model.lm_head.out_features
    try:
        chunked = chunked_causal_lm_loss(model, batch, extra.get("num_items_in_batch"), chunk_logits=7 * vocab)
        chunked.backward()
    finally:
        hook.remove()
    got = gradients(model)
    torch.testing.assert_close(chunked, standard, atol=1e-6, rtol=1e-6)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    # lm_head never saw more than one chunk: the model's own call gets no position at all
    assert seen[0] == 0 and max(seen) == 7 and len(seen) > 10


def _tower_output_records_graph(model, batch) -> bool:
    seen = []
    tower = model.get_base_model().model.vision_tower if hasattr(model, "get_base_model") else model.model.vision_tower
    hook = tower.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model(**model_inputs(batch))
    finally:
        hook.remove()
    return any(h is not None and h.grad_fn is not None for h in seen[0].hidden_states)


def test_frozen_tower_keeps_no_autograd_graph(tiny_parts, tiny):
    """LoRA + gradient checkpointing hooks every sub-model's input embeddings (transformers 5), the
    frozen tower's patch embedding too: the stock forward then records the tower's graph."""
    _, items = tiny
    torch.manual_seed(0)
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.float32)
    loaded.model.requires_grad_(False)
    loaded.model.model.multi_modal_projector.requires_grad_(True)
    model = apply_lora(loaded.model, r=4, alpha=8, dropout=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = PackingCollator()(items[:3])
    assert _tower_output_records_graph(model, batch), "stock forward no longer records the frozen tower"
    run_frozen_tower_without_grad(model)
    assert not _tower_output_records_graph(model, batch)
    model(**model_inputs(batch)).loss.backward()  # the projector still learns
    assert model.get_base_model().model.multi_modal_projector.linear_1.weight.grad is not None
    tower = model.get_base_model().model.vision_tower
    tower.requires_grad_(True)  # unfrozen later: trains normally
    assert _tower_output_records_graph(model, batch)


def test_projector_and_language_model_run_in_one_dtype(tiny_parts, tiny):
    """bfloat16 as on a GPU: the projector's output and everything the LLM reads share the dtype."""
    _, items = tiny
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.bfloat16)
    model = loaded.model
    model.train()
    run_frozen_tower_without_grad(model)
    seen = {}
    def record(name, tensor):
        seen.setdefault(name, tensor.dtype)  # returns None: the hooks change nothing

    model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: record("projector", out))
    model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: record("llm", kwargs["inputs_embeds"]), with_kwargs=True)
    model(**model_inputs(PackingCollator()(items[:3]))).loss.backward()
    assert seen == {"projector": torch.bfloat16, "llm": torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _train(tiny_parts, data, out, *flags):
    argv = ["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"],
            "--data_path", data["data_path"], "--image_folder", data["image_folder"], "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--max_steps", "4", "--learning_rate", "3e-3", *flags]
    train_module.train(argv=argv)
    with open(os.path.join(out, "trainer_state.json")) as f:
        return [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]


def test_training_with_packing_and_chunked_ce_follows_the_same_losses(tmp_path, tiny_parts, mixed_data):
    from safetensors.torch import load_file

    plain = _train(tiny_parts, mixed_data, tmp_path / "plain")
    fast = _train(tiny_parts, mixed_data, tmp_path / "fast", "--packing", "True", "--chunked_ce", "True")
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert fast == pytest.approx(plain, abs=1e-4)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "fast" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)


def test_group_by_length_strategy_uses_the_modality_sampler(tmp_path):
    _, _, args = parse_args([*required_flags(tmp_path),
                             "--train_sampling_strategy", "group_by_length", "--per_device_train_batch_size", "2"])
    dataset = SimpleNamespace(modality_lengths=[5, -3, 7, -4])
    sampler = LlavaTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=dataset))
    assert isinstance(sampler, ModalityLengthGroupedSampler) and sorted(sampler) == [0, 1, 2, 3]


def test_adamw_bnb_8bit_runs_on_cpu(tmp_path, tiny_parts, tiny):
    """--optim adamw_bnb_8bit: bitsandbytes keeps 8-bit Adam states on a CPU too."""
    loaded, items = tiny
    model_args, _, args = parse_args([*required_flags(tmp_path), "--optim", "adamw_bnb_8bit",
                             "--learning_rate", "1e-3", "--report_to", "none"])
    model = assemble_model(tiny_parts["llm"], tiny_parts["clip"], dtype=torch.float32).model
    model.train()
    optimizer = LlavaTrainer(model=model, args=args, recipe=FullFinetune(model_args, args)).create_optimizer()
    before = model.lm_head.weight.detach().clone()
    summed_loss(model, DataCollatorForSupervisedDataset(loaded.tokenizer.pad_token_id)(items[:2])).backward()
    optimizer.step()
    assert optimizer.state[model.lm_head.weight]["state1"].dtype == torch.uint8
    assert not torch.equal(model.lm_head.weight, before)


def test_chunked_ce_is_refused_under_zero3(tmp_path):
    """ZeRO-3 hands a frozen lm_head's partitioned weight to the chunk recomputation in backward."""
    import subprocess
    import sys

    code = ("from llava_tiny.train.arguments import parse_args\n"
            f"parse_args(['--model_name_or_path', 'm', '--output_dir', {str(tmp_path)!r}, '--chunked_ce', 'True', "
            "'--deepspeed', 'zero_configs/zero3.json'])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--chunked_ce cannot run under ZeRO-3" in result.stderr
