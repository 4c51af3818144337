"""The functions an lmms-eval task written by `eval.lmms_task` names (`!function utils.<name>`).

`eval.lmms_task` copies this file next to the task's YAML as `utils.py`. lmms-eval runs in an environment of
its own, so nothing of ours is imported here: only the standard library and PIL. Each document is one
question as `eval.generate` asks it: `question` (with its `<image>` markers), `history` (earlier turns with
their reference answers), `system` (the sample's own system message, or null), `image_paths` (relative to
this folder) and `references`.
"""
import os
import string

from PIL import Image

IMAGE_TOKEN = "<image>"
HERE = os.path.dirname(os.path.abspath(__file__))


def _load_image(relative_path):
    """RGB pixels as eval.generate gets them (llava_tiny.images.load_image + to_rgb): transparent pixels on
    white. A plain convert("RGB"), what a processor does, would show the colour stored under them."""
    with Image.open(os.path.join(HERE, relative_path)) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            canvas.alpha_composite(image.convert("RGBA"))
            return canvas.convert("RGB")
        return image.convert("RGB")


def _user_turn(text, images):
    """A user message whose `<image>` markers become image items, in order: the saved chat template renders
    an image item as "<image>\\n", which the marker's own newline (if any) would double."""
    parts = text.split(IMAGE_TOKEN)
    content = [{"type": "text", "text": parts[0]}] if parts[0] else []
    for part in parts[1:]:
        content.append({"type": "image", "url": images.pop(0)})
        part = part[1:] if part.startswith("\n") else part
        if part:
            content.append({"type": "text", "text": part})
    return {"role": "user", "content": content}


def doc_to_messages(doc):
    """The whole conversation (system, earlier turns, this question) for chat models (`--model llava_hf`)."""
    images = doc_to_visual(doc)
    messages = [{"role": "system", "content": [{"type": "text", "text": doc["system"]}]}] if doc.get("system") else []
    for turn in doc.get("history") or []:
        messages.append(_user_turn(turn["question"], images))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    messages.append(_user_turn(doc["question"].strip(), images))
    return messages


def doc_to_visual(doc):
    return [_load_image(path) for path in doc["image_paths"]]


def doc_to_text(doc):
    """The question without its markers (simple models prepend one `<image>` per image themselves)."""
    text = doc["question"].replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "")
    return text.replace(IMAGE_TOKEN, "").strip()


def doc_to_target(doc):
    return doc["references"][0]


def _normalize(answer):
    return answer.strip().lower().rstrip(string.punctuation).strip()


def process_results(doc, results):
    """exact_match: the answer equals a reference, ignoring case, surrounding spaces and final punctuation."""
    prediction = results[0] if isinstance(results[0], str) else getattr(results[0], "text", str(results[0]))
    return {"exact_match": float(_normalize(prediction) in {_normalize(r) for r in doc["references"]})}
