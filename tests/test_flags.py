"""Flags: every problem reported at once before any model loads, LLaVA flags with no effect named at
start, --cache_dir reaching every from_pretrained, and train.py runnable as a script."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import required_flags, write_color_dataset
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import FlagError, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_flag_problem_is_reported_at_once_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_starting_point", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError) as err:
        train_module.train(argv=["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"),
                                 "--image_folder", str(tmp_path / "nowhere"), "--mm_projector_type", "mlp2x_relu",
                                 "--version", "no_such_template", "--bits", "4", "--tune_mm_mlp_adapter", "True"])
    message = str(err.value)
    for expected in ("--model_name_or_path m: ", "--data_path is required", f"--image_folder {tmp_path / 'nowhere'}",
                     "--mm_projector_type: unknown mm_projector_type 'mlp2x_relu'", "--version: unknown conversation",
                     "--bits 4 quantizes the LLM"):
        assert expected in message, message
    assert not (tmp_path / "out").exists()  # nothing written either


def test_a_missing_data_file_is_named_with_its_flag(tmp_path):
    flags = required_flags(tmp_path)
    flags[flags.index("--data_path") + 1] = str(tmp_path / "missing.json")
    with pytest.raises(FlagError, match=f"--data_path {tmp_path / 'missing.json'}: no such file"):
        parse_args(flags + ["--eval_data_path", str(tmp_path / "missing-eval.json")])


def test_flags_with_no_effect_are_named_at_start(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="llava_tiny.train.arguments"):
        parse_args(required_flags(tmp_path) + ["--lazy_preprocess", "True", "--mpt_attn_impl", "triton"])
    lines = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert lines == ["accepted for compatibility, no effect here: --lazy_preprocess, --mpt_attn_impl"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="llava_tiny.train.arguments"):
        parse_args(required_flags(tmp_path))
    assert not [r for r in caplog.records if "no effect here" in r.getMessage()]


def test_a_vision_tower_that_cannot_be_found_is_a_flag_error_that_names_it(tmp_path, tiny_parts):
    """Offline, a tower id missing from the hub cache stops the run at the flags (peer: transformers' own
    OSError from AutoConfig, which used to surface from inside model/vision.py), and so does a non-vision model."""
    flags = required_flags(tmp_path)
    flags[flags.index("--model_name_or_path") + 1] = tiny_parts["llm"]
    for tower in ("nobody/no-such-tower", tiny_parts["llm"]):
        flags[flags.index("--vision_tower") + 1] = tower
        with pytest.raises(FlagError, match=f"--vision_tower {tower}: cannot be used .*text-only run"):
            parse_args(flags)


def test_vision_flags_in_a_text_only_run_are_named_like_other_flags_without_effect(tmp_path, tiny_parts, caplog):
    """--mm_projector_lr and the other tower/projector flags do nothing without a tower: named at start, with
    the same wording as LLaVA's no-effect flags; an empty --vision_tower (VISION_TOWER="" in the scripts) is none."""
    flags = required_flags(tmp_path)
    flags[flags.index("--model_name_or_path") + 1] = tiny_parts["llm"]
    flags[flags.index("--vision_tower") + 1] = ""
    with caplog.at_level("WARNING", logger="llava_tiny.train.arguments"):
        args = parse_args(flags + ["--mm_projector_lr", "2e-5", "--image_folder", "", "--lazy_preprocess", "True"])
    assert args.model.vision_tower is None and args.data.image_folder is None
    lines = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert lines == ["accepted for compatibility, no effect here: --lazy_preprocess",
                     "no effect in a text-only run (no vision tower, no projector): --mm_projector_lr, --image_folder"]
    with pytest.raises(FlagError, match="--pretrain_mm_mlp_adapter .*: a text-only run"):
        parse_args(flags + ["--pretrain_mm_mlp_adapter", str(tmp_path)])


def _into_hub_cache(folder: str, cache_dir, repo_id: str) -> None:
    """Lay `folder` out as huggingface_hub caches a download of `repo_id` (what offline mode reads)."""
    revision = "0" * 40
    repo = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo, "snapshots", revision))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)


def test_cache_dir_reaches_every_from_pretrained(tmp_path, tiny_parts, color_data):
    """Hub ids that exist only in --cache_dir (offline): the run finds the LLM, its tokenizer, the tower
    and its image processor there, and fails without the flag."""
    cache = tmp_path / "cache"
    _into_hub_cache(tiny_parts["llm"], cache, "tiny-org/tiny-llm")
    _into_hub_cache(tiny_parts["clip"], cache, "tiny-org/tiny-clip")
    argv = ["--model_name_or_path", "tiny-org/tiny-llm", "--vision_tower", "tiny-org/tiny-clip",
            "--data_path", color_data["data_path"], "--image_folder", color_data["image_folder"],
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none"]
    with pytest.raises(FlagError, match="--model_name_or_path tiny-org/tiny-llm: .*couldn't find them in the cached"):
        train_module.train(argv=argv + ["--output_dir", str(tmp_path / "without")])
    train_module.train(argv=argv + ["--output_dir", str(tmp_path / "with"), "--cache_dir", str(cache)])
    with open(tmp_path / "with" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 1


def test_train_py_runs_as_a_script_from_the_repo_root(tmp_path, tiny_parts):
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")  # the script finds its package itself
    script = os.path.join("llava_tiny", "train", "train.py")
    shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "--model_name_or_path" in shown.stdout and "--cache_dir" in shown.stdout
    data = write_color_dataset(str(tmp_path), n=4)
    done = subprocess.run([sys.executable, script, "--model_name_or_path", tiny_parts["llm"], "--vision_tower",
                           tiny_parts["clip"], "--data_path", data, "--image_folder", str(tmp_path), "--output_dir",
                           str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "1",
                           "--save_strategy", "no", "--report_to", "none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_run_that_fails_leaves_no_watchdog_behind(tmp_path, tiny_parts, color_data, monkeypatch):
    """The hang watchdog ends the process when nothing progresses: it must stop with the run, however the
    run ends (else a test process, or a notebook, is killed minutes later)."""
    import threading

    from llava_tiny.train.trainer import LlavaTrainer

    def fails(self, *args, **kwargs):
        raise RuntimeError("the training loop failed")

    monkeypatch.setattr(LlavaTrainer, "training_step", fails)  # inside the loop: the watchdog is running
    with pytest.raises(RuntimeError, match="the training loop failed"):
        train_module.train(argv=["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"],
                                 "--data_path", color_data["data_path"], "--image_folder", color_data["image_folder"],
                                 "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"])
    assert not [t for t in threading.enumerate() if "watchdog" in t.name and t.is_alive()]


def test_each_flag_group_checks_its_own_values_before_anything_loads(tmp_path, monkeypatch):
    """Values outside what the code accepts are refused at the flags, with the rest, before a model loads; the
    values --mm_vision_select_feature takes are the vision tower's select strategies (model/vision.py), and the
    image settings' are images.py's."""
    from llava_tiny.images import IMAGE_BACKGROUNDS
    from llava_tiny.model.vision import SELECT_FEATURES

    monkeypatch.setattr(train_module, "load_starting_point", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError) as err:
        train_module.train(argv=[*required_flags(tmp_path), "--mm_vision_select_feature", "cls",
                                 "--image_background", "black", "--image_aspect_ratio", "crop",
                                 "--max_bad_sample_fraction", "2", "--lora_enable", "True", "--bits", "4",
                                 "--quant_type", "int4", "--lora_bias", "some", "--lora_r", "0",
                                 "--tune_mm_mlp_adapter", "True", "--freeze_mm_mlp_adapter", "True"])
    message = str(err.value)
    for expected in (f"--mm_vision_select_feature: unknown mm_vision_select_feature 'cls'; expected one of "
                     f"{', '.join(SELECT_FEATURES)}", f"--image_background 'black': expected one of "
                     f"{', '.join(IMAGE_BACKGROUNDS)}", "--image_aspect_ratio 'crop': expected one of pad",
                     "--max_bad_sample_fraction 2.0: expected a fraction", "--quant_type 'int4': expected one of nf4",
                     "--lora_bias 'some': expected one of none", "--lora_r 0: expected a rank",
                     "--tune_mm_mlp_adapter (stage 1) trains only the projector; do not combine it with --lora_enable",
                     "--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter: nothing would train"):
        assert expected in message, message
    assert not os.path.exists(tmp_path / "out")


def test_a_flag_that_no_group_has_is_refused_with_the_other_problems(tmp_path):
    with pytest.raises(FlagError) as err:
        parse_args([*required_flags(tmp_path), "--lora_rank", "8", "--bits", "3"])
    message = str(err.value)
    assert "--lora_rank is not used by train.py: unknown flag" in message and "--bits 3: expected 4, 8 or 16" in message


def test_the_checks_that_need_the_loaded_model_report_together_before_the_recipe_runs(tmp_path, tiny_parts, color_data,
                                                                                      monkeypatch):
    """--lora_target_modules (the model's layer names) and --packing (the attention implementation it loaded with)
    are the only flags checked after the model loads: both problems in one FlagError, before any adapter is added."""
    from llava_tiny.train.recipes import Recipe

    monkeypatch.setattr(Recipe, "prepare", lambda *a: pytest.fail("the recipe ran before the flags were checked"))
    args = parse_args(["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"],
                       "--data_path", color_data["data_path"], "--image_folder", color_data["image_folder"],
                       "--output_dir", str(tmp_path / "out"), "--lora_enable", "True", "--lora_target_modules", "qkv",
                       "--packing", "True"])
    with pytest.raises(FlagError) as err:
        train_module.build_trainer(args, attn_implementation="eager")
    message = str(err.value)
    assert "--lora_target_modules qkv: matches no linear layer" in message, message
    assert "--packing needs attn_implementation 'sdpa' or 'flash_attention_2'; the language model uses 'eager'" in message
