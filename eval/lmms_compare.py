"""Compare lmms-eval's answers with eval.generate's, question by question.

    python -m eval.lmms_compare --lmms-samples runs/lmms_compare/lmms/.../*_samples_llava_tiny_compare.jsonl \
        --task-data runs/lmms_compare/task/llava_tiny_compare.jsonl --preds runs/lmms_compare/preds.jsonl \
        --out runs/lmms_compare/comparison.json

Reads lmms-eval's `--log_samples` file (0.7.3: one JSON line per document with its `doc_id`, the row of the
task's data file, and `filtered_resps`) and eval.generate's predictions, matched by the question id that
`eval.lmms_task` put in each row.
Answers are compared exactly, and again with surrounding whitespace ignored (lmms-eval does not strip what
it decodes). Exit 0 when every question lmms-eval answered has the same answer (after stripping) from
eval.generate, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys


def _first_text(value):
    """lmms-eval logs responses nested in lists (one per repeat, one per filter)."""
    while isinstance(value, list):
        value = value[0] if value else ""
    return value.get("text", "") if isinstance(value, dict) else str(value)


def read_lmms_answers(samples_path: str, task_data_path: str) -> dict[str, str]:
    """Question id -> lmms-eval's answer (a sample names its document by row: `doc_id`)."""
    with open(task_data_path, encoding="utf-8") as f:
        ids = [str(json.loads(line)["id"]) for line in f if line.strip()]
    answers = {}
    with open(samples_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                sample = json.loads(line)
                answers[ids[sample["doc_id"]]] = _first_text(sample.get("filtered_resps", sample.get("resps")))
    return answers


def read_predictions(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return {str(row["id"]): row["prediction"] for row in map(json.loads, f) if row}


def compare(lmms: dict[str, str], ours: dict[str, str]) -> dict:
    """Counts of questions answered by both, identical answers, answers equal once stripped, and the others."""
    shared = sorted(set(lmms) & set(ours))
    differing = [{"id": i, "lmms_eval": lmms[i], "eval_generate": ours[i]} for i in shared
                 if lmms[i].strip() != ours[i].strip()]
    return {"questions": len(shared), "only_lmms_eval": len(set(lmms) - set(ours)),
            "only_eval_generate": len(set(ours) - set(lmms)),
            "identical": sum(lmms[i] == ours[i] for i in shared),
            "equal_stripped": len(shared) - len(differing), "differing": differing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmms-samples", required=True, help="lmms-eval's *_samples_<task>.jsonl (--log_samples)")
    parser.add_argument("--task-data", required=True, help="the task's data file (eval.lmms_task's <task>.jsonl)")
    parser.add_argument("--preds", required=True, help="eval.generate's predictions (JSON lines)")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    result = compare(read_lmms_answers(args.lmms_samples, args.task_data), read_predictions(args.preds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    n = result["questions"]
    print(f"lmms-eval vs eval.generate: {result['equal_stripped']}/{n} answers agree "
          f"({result['identical']} byte for byte); {result['only_lmms_eval']} only in lmms-eval, "
          f"{result['only_eval_generate']} only in eval.generate")
    for row in result["differing"][:10]:
        print(f"  {row['id']}: lmms-eval {row['lmms_eval']!r} != eval.generate {row['eval_generate']!r}")
    return 0 if n > 0 and not result["only_lmms_eval"] and not result["differing"] else 1


if __name__ == "__main__":
    sys.exit(main())
