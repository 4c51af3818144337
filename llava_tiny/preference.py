"""Preference pairs (DPO): their rules, and their tokens built by the same template code as SFT.

A pair is two LLaVA conversations that share every turn but the last answer: earlier turns, the
prompt, then `chosen` or `rejected`. Each is tokenized by `conversation.tokenize_conversation`;
labels are kept only on the final answer (and its end-of-turn token), so the log-probability DPO
compares is that of the answer alone. The record forms are read by `data.preference_parts`;
`checks` applies `preference_problems` to records, as it applies the conversation rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from .conversation import (IGNORE_INDEX, IMAGE_TOKEN, ConversationError, SampleTooLongError, TokenizedConversation,
                           marker_problem, tokenize_conversation, turn_problems)
from .data import preference_parts, sample_images


def preference_problems(sample: dict) -> list[tuple[str, str]]:
    """(kind, message) for each rule a preference record breaks; [] when it keeps them all.

    no_prompt, missing_chosen / missing_rejected, identical_answers, image_in_answer, the turn rules
    of earlier turns, bad_image_field and image_marker_mismatch (markers in the prompt and earlier
    questions, one per image).
    """
    parts = preference_parts(sample)
    problems = list(parts.problems)
    if parts.problems:
        return problems
    if not isinstance(parts.prompt, str) or not parts.prompt.strip():
        problems.append(("no_prompt", "the prompt is missing or empty; expected the question the answers reply to "
                                      "('prompt', or the last user message of 'messages')"))
    for name, answer in (("chosen", parts.chosen), ("rejected", parts.rejected)):
        if not isinstance(answer, str) or not answer.strip():
            problems.append((f"missing_{name}", f"'{name}' is missing or empty; expected the {name} answer as text "
                                                "or an assistant message"))
        elif IMAGE_TOKEN in answer:
            problems.append(("image_in_answer", f"'{name}' contains {IMAGE_TOKEN}; expected markers in the prompt only"))
    if isinstance(parts.chosen, str) and isinstance(parts.rejected, str) and parts.chosen.strip() and \
            parts.chosen.strip() == parts.rejected.strip():
        problems.append(("identical_answers", "'chosen' and 'rejected' are the same text: the pair teaches nothing"))
    if parts.history:
        problems += [(kind, f"earlier turns: {message}") for kind, message in turn_problems(parts.history)]
    images = sample_images(sample)
    if any(not isinstance(p, str) or not p.strip() for p in images):
        problems.append(("bad_image_field", f"'image' is {sample.get('image')!r}; expected a relative path or a "
                                            "list of them"))
    elif isinstance(parts.prompt, str) and parts.prompt.strip():  # no prompt is already no_prompt
        questions = [t.get("value") for t in parts.history[::2] if isinstance(t, dict)]
        markers = sum(q.count(IMAGE_TOKEN) for q in [*questions, parts.prompt] if isinstance(q, str))
        mismatch = marker_problem(markers, len(images))
        if mismatch:
            problems.append(("image_marker_mismatch", mismatch))
    return problems


def preference_conversations(sample: dict) -> tuple[list[dict], list[dict]]:
    """The record as two LLaVA conversations: earlier turns + prompt + the chosen (then rejected) answer."""
    parts = preference_parts(sample)
    shared = [*parts.history, {"from": "human", "value": parts.prompt}]
    return ([*shared, {"from": "gpt", "value": parts.chosen}], [*shared, {"from": "gpt", "value": parts.rejected}])


@dataclass
class TokenizedPair:
    chosen: TokenizedConversation
    rejected: TokenizedConversation

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _final_answer_only(conversation: list[dict], tokenizer, template, num_image_tokens: int, num_images: int,
                       sample_id) -> TokenizedConversation:
    tokens = tokenize_conversation(conversation, tokenizer, template, num_image_tokens, num_images=num_images,
                                   sample_id=sample_id)
    if len(conversation) > 2:
        # Chunks are tokenized one by one and concatenated, so the earlier turns alone give exactly the
        # prefix of the whole: everything in it is context, never a DPO target.
        prefix = tokenize_conversation(conversation[:-2], tokenizer, template, num_image_tokens,
                                       sample_id=sample_id).input_ids
        if tokens.input_ids[:len(prefix)] != prefix:
            raise ConversationError(f"sample {sample_id!r}: the earlier turns do not tokenize to a prefix of the "
                                    f"conversation with template {getattr(template, 'name', template)!r}")
        tokens.labels[:len(prefix)] = [IGNORE_INDEX] * len(prefix)
    return tokens


def tokenize_preference(sample: dict, tokenizer, template="llava_v1", num_image_tokens: int = 576,
                        model_max_length: int | None = None, sample_id=None) -> TokenizedPair:
    """Tokenize a preference record: chosen and rejected sequences with labels only on their final answer.

    A pair is never truncated (cutting turns would cut the answers compared): one that does not fit
    `model_max_length` raises `SampleTooLongError` naming the sample; a record that breaks the rules
    raises `ConversationError` with the first problem.
    """
    problems = preference_problems(sample)
    if problems:
        raise ConversationError(f"sample {sample_id!r}: {problems[0][1]}")
    num_images = len(sample_images(sample))
    chosen, rejected = (_final_answer_only(conversation, tokenizer, template, num_image_tokens, num_images, sample_id)
                        for conversation in preference_conversations(sample))
    pair = TokenizedPair(chosen, rejected)
    if model_max_length is not None and pair.length > model_max_length:
        raise SampleTooLongError(f"sample {sample_id!r}: the pair needs {pair.length} tokens but model_max_length is "
                                 f"{model_max_length}; a preference pair is never truncated (its answers would be "
                                 "cut): shorten it, drop it, or raise --model_max_length")
    return pair
