"""Write an lmms-eval task from a split of ours, so that the community's harness asks what eval.generate asks.

    python -m eval.lmms_task --data runs/demo/data/sets/data_test.json --image-folder runs/demo/data \\
        --out runs/lmms_task --max-new-tokens 24
    lmms-eval --model llava_hf --model_args pretrained=runs/demo/model,device=cpu,device_map=cpu \\
        --tasks llava_tiny_data_test --include_path runs/lmms_task --batch_size 1 --log_samples \\
        --output_path runs/lmms_out --verbosity DEBUG

Writes, for lmms-eval 0.7.3 (docs/evaluation.md, "Evaluate with lmms-eval"), into `--out`:
  <task>.yaml   a local task: `dataset_path: json` on the file below, greedy generation, `exact_match`
  <task>.jsonl  one line per question, as eval.generate expands them (same ids, turns, checks, history)
  utils.py      doc_to_messages / doc_to_visual / doc_to_text / process_results (eval/lmms_task_utils.py)
The task name defaults to `llava_tiny_<split file name>`. Image paths are stored relative to `--out`.
Text-only questions are left out, and counted: lmms-eval 0.7.3's llava_hf hands the model an empty image
tensor for them, which fails inside generate ("not enough values to unpack"), and it logs an empty answer.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

from eval.generate import expand_questions
from llava_tiny.data import load_samples

UTILS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_task_utils.py")

TASK_YAML = """\
# Written by python -m eval.lmms_task from {source}; lmms-eval 0.7.3 task format.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_messages: !function utils.doc_to_messages
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def task_documents(samples: list[dict], image_folder: str | None, out_dir: str,
                   allow_images_outside_folder: bool = False, file: str | None = None) -> tuple[list[dict], int]:
    """One lmms-eval document per question of `samples` with an image, in eval.generate's order and with its
    ids; and how many text-only questions were left out."""
    docs, text_only = [], 0
    for q in expand_questions(samples, image_folder, allow_images_outside_folder, file=file):
        if not q.image_paths:
            text_only += 1
            continue
        docs.append({"id": q.id, "question": q.question,
                     "history": [{"question": question, "answer": answer} for question, answer in q.history],
                     "system": q.system, "references": q.record["references"],
                     "image_paths": [os.path.relpath(path, out_dir) for path in q.image_paths]})
    return docs, text_only


def default_task_name(data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(data_path))[0]
    return "llava_tiny_" + re.sub(r"\W+", "_", stem).strip("_").lower()


def write_task(data_path: str, image_folder: str | None, out_dir: str, task: str | None = None,
               max_new_tokens: int = 64, allow_images_outside_folder: bool = False) -> dict[str, str]:
    """Write `<task>.yaml`, `<task>.jsonl` and `utils.py` into `out_dir`; returns their paths, the task name and
    the counts of questions written and text-only questions left out."""
    task = task or default_task_name(data_path)
    os.makedirs(out_dir, exist_ok=True)
    docs, text_only = task_documents(load_samples(data_path), image_folder, out_dir, allow_images_outside_folder,
                                     file=data_path)
    data_file = os.path.abspath(os.path.join(out_dir, f"{task}.jsonl"))  # datasets resolves it from the cwd
    with open(data_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    yaml_file = os.path.join(out_dir, f"{task}.yaml")
    with open(yaml_file, "w", encoding="utf-8") as f:
        # JSON strings are YAML scalars: paths with spaces or colons stay one value
        f.write(TASK_YAML.format(source=data_path, task=task, data_file=json.dumps(data_file),
                                 max_new_tokens=max_new_tokens))
    utils_file = os.path.join(out_dir, "utils.py")
    shutil.copyfile(UTILS_SOURCE, utils_file)
    return {"task": task, "yaml": yaml_file, "data": data_file, "utils": utils_file, "questions": len(docs),
            "text_only_left_out": text_only}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a split of ours: LLaVA JSON/JSONL (or `messages`) records")
    parser.add_argument("--image-folder", "--image_folder", default=None)
    parser.add_argument("--out", required=True, help="the folder to pass to lmms-eval's --include_path")
    parser.add_argument("--task", default=None, help="task name (default: llava_tiny_<split file name>)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64,
                        help="as eval.generate's --max-new-tokens (the same default)")
    parser.add_argument("--allow-images-outside-folder", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = write_task(args.data, args.image_folder, args.out, args.task, args.max_new_tokens,
                             args.allow_images_outside_folder)
    except (OSError, ValueError) as err:  # DataFileError and ConversationError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{written['yaml']}: task {written['task']}, {written['questions']} questions ({written['data']})")
    if written["text_only_left_out"]:
        print(f"left out {written['text_only_left_out']} text-only question(s): lmms-eval 0.7.3's llava_hf cannot "
              "answer them (an empty image tensor fails inside generate)")
    print(f"run: lmms-eval --model llava_hf --model_args pretrained=MODEL,device=cpu,device_map=cpu "
          f"--tasks {written['task']} --include_path {args.out} --batch_size 1 --log_samples --output_path OUT "
          f"--verbosity DEBUG   (GPU: device=cuda,device_map=cuda:0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
