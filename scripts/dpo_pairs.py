"""Preference pairs from a model's own mistakes: for each question of DATA the model answered wrongly
(`eval.generate` lines in PREDS), chosen = the reference answer, rejected = the model's answer.

    python scripts/dpo_pairs.py --data sets/data_train.json --preds greedy.jsonl sampled.jsonl --out pairs.json

Several prediction files (greedy, and sampled with --temperature 1) give the mistakes the model makes
where it is unsure too, not only its greedy ones: pairs on every question type, not only on the
answers it gets wrong most. Answers are compared after the VQA normalisation `eval.score` uses; the
same wrong answer to one question gives one pair. Only single-turn samples are used.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.io import write_samples  # noqa: E402
from eval.vqa_metrics import normalize_vqa_answer  # noqa: E402
from llava_tiny.data import load_samples, sample_id  # noqa: E402


def mistake_pairs(samples: list[dict], predictions: list[dict]) -> list[dict]:
    """One pair per distinct wrong answer to a single-turn sample: its prompt, the reference answer (chosen),
    the model's answer (rejected)."""
    predicted: dict[str, dict[str, str]] = {}
    for line in predictions:
        answer = (line.get("prediction") or "").strip()
        if answer:
            predicted.setdefault(line["id"], {}).setdefault(normalize_vqa_answer(answer), answer)
    pairs = []
    for index, sample in enumerate(samples):
        sid, turns = sample_id(sample, index), sample.get("conversations") or []
        if len(turns) != 2:
            continue
        reference = turns[1]["value"]
        wrong = [a for key, a in predicted.get(sid, {}).items() if key != normalize_vqa_answer(reference)]
        for number, answer in enumerate(wrong):
            pair = {"id": sid if number == 0 else f"{sid}#{number}", "prompt": turns[0]["value"], "chosen": reference,
                    "rejected": answer}
            pairs.append({**pair, **{k: v for k, v in sample.items() if k not in ("id", "conversations")}})
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the samples the predictions answer (LLaVA JSON/JSONL)")
    parser.add_argument("--preds", required=True, nargs="+", help="eval.generate outputs (JSONL)")
    parser.add_argument("--out", required=True, help="preference pairs to write (JSON, or JSONL)")
    args = parser.parse_args(argv)
    samples = load_samples(args.data)
    predictions = []
    for path in args.preds:
        with open(path) as f:
            predictions += [json.loads(line) for line in f if line.strip()]
    pairs = mistake_pairs(samples, predictions)
    write_samples(args.out, pairs)
    print(f"{args.out}: {len(pairs)} pairs from {len(predictions)} answers ({len(pairs) / max(len(predictions), 1):.0%} "
          "wrong)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
