"""Generate answers for an evaluation set, in batches, resumable.

    python -m eval.generate --model-path runs/lora --data data/sets/data_test.json \
        --image-folder data/imagenes --out runs/lora/preds.jsonl --batch-size 16 --max-new-tokens 64

Writes one JSON line per question: `id`, `image`, `question` (without `<image>`), `prediction`,
`references`, plus the sample's other plain fields (`answer_type`, `question_type`, `source`,
`task`, a converter's `label`, ...), which `eval.score` reads and can group by.
A sample with several (human, gpt) turns gives one line per turn (`ID#0`, `ID#1`, ...); turn k is
prompted with the ground-truth turns before it as history.

Lines are appended and flushed after each batch, and ids already in `--out` are skipped, so an
interrupted run picks up where it stopped (a half-written last line is dropped first).
`--blank-images` replaces every image by a blank one of the same size in the image processor's
mean colour: the "blind" control that shows how much the answers depend on the image.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from llava_tiny.checks import check_samples
from llava_tiny.conversation import IMAGE_TOKEN, ConversationError, conversation_turns
from llava_tiny.data import load_samples, record_format, sample_id
from llava_tiny.images import add_image_flags, load_image
from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch

logger = logging.getLogger("eval.generate")

# A sample's fields not copied to its lines: the line has its own id, image, question and references, and the
# conversation itself (in any of the reader's formats) is not a label to group by.
NOT_PASSED_THROUGH = ("id", "image", "conversations", "references", "question", "prediction", "messages", "system",
                      "text", "prompt", "chosen", "rejected")


@dataclass
class Question:
    """One turn of one sample, ready to prompt."""

    id: str
    question: str  # with its <image> markers, as in the data
    history: list[tuple[str, str]]
    image_paths: list[str]  # resolved paths of the images whose markers are in the prompt
    record: dict = field(default_factory=dict)  # the output line, minus the prediction
    system: str | None = None  # the sample's own system message (it replaces the template's)


def strip_image_markers(text: str) -> str:
    """The question as a person reads it: `<image>` markers (and the newline glued to them) removed."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def _turn_references(sample: dict, sid: str, turns: list[tuple[str, str]]) -> list[list[str]]:
    """References per turn: the sample's `references` if present, else each turn's gpt answer.

    A single-turn sample gives `references` as a list of strings; a multi-turn sample gives one
    list per turn (a flat list would be ambiguous about which turn it belongs to).
    """
    refs = sample.get("references")
    if refs is None:
        return [[answer] for _, answer in turns]
    if isinstance(refs, str):
        refs = [refs]
    if len(turns) == 1 and all(isinstance(r, str) for r in refs):
        return [list(refs)]
    if len(refs) == len(turns) and all(isinstance(r, list) and all(isinstance(x, str) for x in r) for r in refs):
        return [list(r) for r in refs]
    raise ConversationError(f"sample {sid!r}: 'references' must be a list of strings (single-turn sample) or one list "
                            f"of strings per turn ({len(turns)} turns); found {json.dumps(refs)[:200]}")


def expand_questions(samples: list[dict], image_folder: str | None, allow_outside: bool = False,
                     file: str | None = None) -> list[Question]:
    """Every (sample, turn) as a `Question`, checked before any model work starts.

    Raises `ConversationError` naming the samples that break a rule of `llava_tiny.checks`
    (conversation, markers, image paths, images that exist and decode), whose references are
    malformed, or whose ids repeat.
    """
    checked = check_samples(samples, file=file, image_folder=image_folder, allow_outside=allow_outside,
                            images="header")
    problems = [str(problem) for problem in checked.errors]
    bad = {problem.index for problem in checked.errors}
    questions: list[Question] = []
    for index, sample in enumerate(samples):
        if index in bad:
            continue
        sid = sample_id(sample, index)
        if record_format(sample) == "text":
            problems.append(f"{file + ': ' if file else ''}sample {sid!r}: a formatted 'text' record has no question "
                            "to ask; expected 'conversations' (LLaVA) or 'messages' for evaluation")
            continue
        turns = conversation_turns(sample["conversations"], sid)
        try:
            refs = _turn_references(sample, sid, turns)
        except ConversationError as err:
            problems.append(str(err))
            continue
        paths = checked.paths[index]
        # every other field with a plain value (answer_type, question_type, source, task, label, ...), so that
        # eval.score can tell captions from VQA and group by any of them (--group-by label)
        extra = {key: value for key, value in sample.items()
                 if key not in NOT_PASSED_THROUGH and isinstance(value, (str, int, float, bool))}
        seen_markers = 0
        for turn, (question, _) in enumerate(turns):
            seen_markers += question.count(IMAGE_TOKEN)
            qid = sid if len(turns) == 1 else f"{sid}#{turn}"
            record = {"id": qid, "image": sample.get("image"), "question": strip_image_markers(question),
                      "references": refs[turn], **extra}
            questions.append(Question(id=qid, question=question, history=turns[:turn],
                                      image_paths=paths[:seen_markers], record=record, system=sample.get("system")))
    counts: dict[str, int] = {}
    for q in questions:
        counts[q.id] = counts.get(q.id, 0) + 1
    repeated = [qid for qid, n in counts.items() if n > 1]
    if repeated:
        problems.append(f"question ids repeat (resuming needs unique ids): {', '.join(repeated[:20])}")
    if problems:
        listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ConversationError(f"{len(problems)} problem(s) in the evaluation data:\n  {listing}")
    return questions


def read_finished_ids(out_path: str) -> set[str]:
    """Ids already in `out_path`; a half-written last line (no newline: killed mid-write) is cut off.

    Every line is written with its newline in one write, so only the tail can be incomplete; a bad
    line elsewhere means the file is not ours, and is an error rather than something to skip.
    """
    if not os.path.exists(out_path):
        return set()
    with open(out_path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        logger.warning("%s: dropping a half-written last line (%d bytes) from an interrupted run",
                       out_path, len(data) - complete)
        with open(out_path, "r+b") as f:
            f.truncate(complete)
    finished = set()
    for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            finished.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{out_path}: line {number} is not a prediction record ({line[:80]!r}); "
                             "expected JSON lines with an 'id' written by eval.generate") from None
    return finished


def blank_image(size: tuple[int, int], image_processor) -> Image.Image:
    """An image of `size` filled with the processor's mean colour (about 0 after normalisation)."""
    mean = tuple(int(round(x * 255)) for x in image_processor.image_mean)
    return Image.new("RGB", size, mean)


def _load_images(paths: list[str], image_processor, blank: bool) -> list[Image.Image]:
    if not blank:
        return [load_image(p) for p in paths]
    sizes = []
    for p in paths:
        with Image.open(p) as img:  # the header is enough for the size
            sizes.append(img.size)
    return [blank_image(size, image_processor) for size in sizes]


class _Progress:
    """A tqdm bar on a terminal; a log line every 10% otherwise (never a wall of carriage returns)."""

    def __init__(self, total: int, done: int, enabled: bool | None):
        self.total, self.done, self.initial, self.next_log = total, done, done, done
        self.start = time.time()
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=done, unit="q", desc="generate") if interactive else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_log or self.done == self.total:
            rate = (self.done - self.initial) / max(time.time() - self.start, 1e-9)
            logger.info("generated %d/%d questions (%.1f/s)", self.done, self.total, rate)
            self.next_log = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_predictions(loaded, samples: list[dict], image_folder: str | None, out_path: str, batch_size: int = 16,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                         num_beams: int = 1, conv_mode: str | None = None, image_aspect_ratio: str | None = None,
                         image_background: str | None = None, blank_images: bool = False, allow_images_outside_folder: bool = False,
                         progress: bool | None = None) -> dict[str, int]:
    """Generate a prediction for every question of `samples` not yet in `out_path`, appending lines.

    `loaded` is a `LoadedModel` (`load_pretrained_model`). `progress`: True shows a tqdm bar, False
    logs a line every 10%, None picks the bar only on a terminal. Returns counts: `questions` (all),
    `skipped` (already in the file), `written` (this call).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    questions = expand_questions(samples, image_folder, allow_images_outside_folder)
    finished = read_finished_ids(out_path)
    todo = [q for q in questions if q.id not in finished]
    skipped = len(questions) - len(todo)
    if skipped:
        logger.info("%s already holds %d of %d questions; generating the other %d", out_path, skipped,
                    len(questions), len(todo))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  num_beams=num_beams, image_aspect_ratio=image_aspect_ratio,
                                  image_background=image_background)
    if os.path.dirname(out_path):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    bar = _Progress(len(questions), skipped, progress)
    try:
        with open(out_path, "a", encoding="utf-8") as out:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [build_prompt(loaded, q.question, _load_images(q.image_paths, loaded.image_processor,
                                                                          blank_images), q.history, conv_mode, q.system)
                           for q in batch]
                answers = generate_batch(loaded, prompts, settings, conv_mode)
                lines = [json.dumps({**q.record, "prediction": a}, ensure_ascii=False) + "\n"
                         for q, a in zip(batch, answers)]
                # One write per batch, then to disk: a kill loses at most the batch in flight.
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    finally:
        bar.close()
    return {"questions": len(questions), "skipped": skipped, "written": len(todo)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True,
                        help="any checkpoint: full model, LoRA folder or stage-1 projector folder")
    parser.add_argument("--model-base", "--model_base", default=None,
                        help="base LLM for LoRA/projector checkpoints (default: the path recorded in config.json)")
    parser.add_argument("--data", "--question-file", "--question_file", required=True,
                        help="LLaVA JSON (or JSONL) evaluation set")
    parser.add_argument("--image-folder", "--image_folder", default=None)
    parser.add_argument("--out", "--answers-file", "--answers_file", required=True, help="predictions (JSON lines)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=16)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", "--top_p", type=float, default=None)
    parser.add_argument("--num-beams", "--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--conv-mode", "--conv_mode", default=None,
                        help="chat template (default: the one the checkpoint was trained with)")
    add_image_flags(parser)
    parser.add_argument("--blank-images", action="store_true",
                        help="replace every image by a blank one of the same size (blind control)")
    parser.add_argument("--allow-images-outside-folder", action="store_true")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from llava_tiny.model.builder import load_pretrained_model

    # Check the data (and what is already done) before spending minutes loading a model.
    try:
        samples = load_samples(args.data)
        questions = expand_questions(samples, args.image_folder, args.allow_images_outside_folder, file=args.data)
        finished = read_finished_ids(args.out)
    except (OSError, ValueError) as err:  # DataFileError and ConversationError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if all(q.id in finished for q in questions):
        logger.info("%s already holds all %d predictions; nothing to do", args.out, len(questions))
        return 0
    torch.manual_seed(args.seed)
    loaded = load_pretrained_model(args.model_path, model_base=args.model_base, device=args.device)
    counts = generate_predictions(
        loaded, samples, args.image_folder, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, conv_mode=args.conv_mode,
        image_aspect_ratio=args.image_aspect_ratio, image_background=args.image_background,
        blank_images=args.blank_images,
        allow_images_outside_folder=args.allow_images_outside_folder)
    logger.info("%s: %d questions, %d already there, %d generated now", args.out, counts["questions"],
                counts["skipped"], counts["written"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
