"""A new checkpoint kind is one class: registered here, in the test, it is told apart by the one resolver,
written by `save_checkpoint`, loaded into a live model, loaded fresh by `load_pretrained_model` and served,
with no other file changed. The built-in kinds keep telling folders apart as before."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_tiny.model.assembly import LoadedModel
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.checkpoint_kinds import FULL, LORA, PROJECTOR, TEXT
from llava_tiny.model.checkpoints import (KINDS, CheckpointKind, LoadOptions, read_config, register_kind,
                                          resolve_kind, save_checkpoint)
from llava_tiny.serve.served import ServedModel

WEIGHTS = "llava_weights.safetensors"


class RenamedWeights(CheckpointKind):
    """A full LLaVA whose weights file has another name (as some other tool writes it), rebuilt from the
    parts its config.json records and its weights loaded on top."""

    name, order = "renamed_weights", 5
    expects = f"{WEIGHTS} (a throwaway kind)"
    saves_all_weights = brings_projector = True

    def recognise(self, found) -> bool:
        return WEIGHTS in found.files

    def save(self, model, processor, output_dir, state_dict) -> None:
        save_file({k: v.clone() for k, v in state_dict.items()}, os.path.join(output_dir, WEIGHTS))  # tied: copies
        model.config.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)

    def load_into(self, model, folder) -> None:
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS)), strict=True)

    def load(self, folder, options: LoadOptions) -> LoadedModel:
        config = read_config(folder)
        loaded = assemble_model(config.mm_llm_path, config.mm_vision_tower, mm_projector_type=config.mm_projector_type,
                                version=options.version or config.conversation_template, **options.model)
        self.load_into(loaded.model, folder)
        return loaded


@pytest.fixture
def renamed_weights():
    kind = register_kind(RenamedWeights())
    yield kind
    KINDS.pop(kind.name)


def _logits(loaded):
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        return loaded.model.eval()(input_ids=ids).logits


def test_a_kind_registered_in_one_class_is_resolved_saved_loaded_and_served(tmp_path, tiny_parts, renamed_weights):
    torch.manual_seed(0)
    source = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    with torch.no_grad():
        source.model.model.multi_modal_projector.linear_2.bias.fill_(0.5)
    folder = str(tmp_path / "model")  # the name says nothing: the kind is read from the files
    save_checkpoint(renamed_weights, source.model, source.processor, folder)
    assert resolve_kind(folder) is renamed_weights

    loaded = load_pretrained_model(folder, device="cpu")
    assert loaded.kind is renamed_weights and loaded.kind == "renamed_weights"
    assert torch.all(loaded.model.model.multi_modal_projector.linear_2.bias == 0.5)
    torch.testing.assert_close(_logits(loaded), _logits(source))
    assert ServedModel.resolve(loaded).describe().startswith("renamed_weights checkpoint")

    fresh = assemble_model(tiny_parts["llm"], tiny_parts["clip"])  # into a live model, as resume does
    renamed_weights.load_into(fresh.model, folder)
    torch.testing.assert_close(_logits(fresh), _logits(source))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"expected .*{WEIGHTS} \\(a throwaway kind\\)"):
        resolve_kind(str(empty))


def test_the_built_in_kinds_tell_folders_apart_by_their_files(tmp_path, tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    loaded.save_pretrained(str(tmp_path / "full"))
    save_checkpoint(PROJECTOR, loaded.model, loaded.processor, str(tmp_path / "stage1"))
    assert resolve_kind(str(tmp_path / "full")) is FULL
    assert resolve_kind(str(tmp_path / "stage1")) is PROJECTOR
    assert resolve_kind(tiny_parts["llm"]) is TEXT
    # A LoRA run saved over a full one: the adapter is the newest, the folder is the LoRA.
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert resolve_kind(str(tmp_path / "full")) is LORA
    assert str(LORA) == "lora" and LORA == "lora" and LORA != "full"
