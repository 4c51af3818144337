"""Preference data for the DPO tests: coloured images, chosen = the colour, rejected = another colour."""
import json
import os
import random

from conftest import write_color_dataset

COLORS = ("red", "green", "blue", "yellow")


def write_preference_dataset(root, n=16, text_only=0, seed=0, form="next"):
    """Pairs over `write_color_dataset`'s images; `form` "next" (LLaVA-NeXT) or "messages"."""
    sft = json.load(open(write_color_dataset(str(root), n=n, text_only=text_only, seed=seed)))
    rng = random.Random(seed)
    pairs = []
    for sample in sft:
        question, answer = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        wrong = rng.choice([c for c in COLORS if c != answer]) if answer in COLORS else answer + "0"
        if form == "next":
            pair = {"id": sample["id"], "prompt": question, "chosen": answer, "rejected": wrong}
        else:
            content = [{"type": "image"}, {"type": "text", "text": question.replace("<image>\n", "")}] \
                if "image" in sample else question
            pair = {"id": sample["id"], "messages": [{"role": "user", "content": content}],
                    "chosen": {"role": "assistant", "content": answer},
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]}
        if "image" in sample:
            pair["image"] = sample["image"]
        pairs.append(pair)
    path = os.path.join(str(root), f"pairs-{form}.json")
    with open(path, "w") as f:
        json.dump(pairs, f)
    return path
