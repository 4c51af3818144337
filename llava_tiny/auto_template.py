"""`--version auto`: the tokenizer's own chat template (the Jinja template shipped with the model).

Labels come from rendering growing prefixes of the conversation: each user turn is what rendering up
to it with the generation prompt adds to what came before (not supervised); each answer is what its
turn adds after that generation prompt, through its end-of-turn token (supervised). Whitespace the
template writes after the end-of-turn token is glue for the next turn (not supervised, and dropped
after the last answer, as the hand-written templates do). So Phi-3, Gemma, Qwen2.5, SmolLM2 and
Llama-3.x train with no hand-written entry, and on the official Llama-3 or ChatML template this
gives exactly the ids and labels of `llama_3` / `chatml`.

A template that rewrites earlier turns when one is added (so a rendering is not a prefix of the next)
cannot be split this way: it is refused with `TemplateError`, never mis-masked. The text is tokenized
without adding special tokens (BOS comes from the template, as in `apply_chat_template`).
"""
from __future__ import annotations

import logging
import os

from .templates import AUTO, IMAGE_TOKEN, TemplateError, message_text_jinja, named_template

logger = logging.getLogger(__name__)

_PROBE = [("Hi", "Hello")]
# Marks a processor template that already wraps the model's own (saving and loading must not wrap it twice).
_WRAPPED = "{#- llava-tiny: image parts become <image> markers, then the model's own template -#}"


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("--version auto: the tokenizer has no chat template; expected a model that ships one "
                            "(tokenizer_config.json or chat_template.jinja), or pass --version with a named template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # the template's own raise_exception, or a type it cannot handle
        raise TemplateError(f"--version auto: the tokenizer's chat template fails on this conversation "
                            f"({type(err).__name__}: {err})") from None


def _require_prefix(before: str, after: str, what: str) -> None:
    if after.startswith(before):
        return
    at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    raise TemplateError(
        f"--version auto: the tokenizer's chat template rewrites earlier turns: rendering {what} does not start "
        f"with the rendering before it (at character {at}: {before[at:at + 40]!r} became {after[at:at + 40]!r}), "
        "so the answers cannot be told from the prompts; pass --version with a named template "
        "(vicuna_v1, llava_v1, llama_3, chatml, ...)")


def _answer_end(added: str, kept: int, answer: str, tokenizer) -> int:
    """Where the supervised part of an assistant turn's text `added` ends: after the last special token
    between the answer and `kept` (what the turn keeps when the conversation goes on), else at `kept`."""
    at = added.find(answer)
    if at < 0:
        raise TemplateError(f"--version auto: the tokenizer's chat template does not write the answer as given "
                            f"(expected {answer[:40]!r} in {added[:80]!r}); pass --version with a named template")
    tail_start = at + len(answer)
    if kept < tail_start:
        raise TemplateError("--version auto: the tokenizer's chat template rewrites an answer when the conversation "
                            f"goes on ({added[:tail_start][-40:]!r} is not kept); pass --version with a named template")
    tail = added[tail_start:kept]
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()} - {IMAGE_TOKEN}
    ends = [tail.rfind(s) + len(s) for s in specials if s and s in tail]
    return tail_start + (max(ends) if ends else len(tail))


class AutoTemplate:
    """The tokenizer's chat template, with the interface of `templates.ChatTemplate`."""

    name = AUTO
    bos = False  # BOS is in the text when the model's template writes it
    system = ""
    special_tokens: tuple[str, ...] = ()
    image_only_prompt = False

    def render_chunks(self, turns: list[tuple[str, str | None]], tokenizer,
                      system: str | None = None) -> list[tuple[str, bool]]:
        """Render (user, assistant) pairs as (text, supervised) chunks from growing prefixes (module doc)."""
        messages = [{"role": "system", "content": system.strip()}] if system is not None else []
        prompts, fulls = [], []
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            prompts.append(_render(tokenizer, messages, add_generation_prompt=True))
            if answer is None:
                break
            messages.append({"role": "assistant", "content": answer})
            fulls.append(_render(tokenizer, messages, add_generation_prompt=False))
        if len(fulls) == len(prompts):  # what the last answer keeps when the conversation goes on
            prompts.append(_render(tokenizer, [*messages, {"role": "user", "content": _PROBE[0][0]}], True))
        chunks: list[tuple[str, bool]] = []
        done = ""  # the text of the chunks so far
        for k, ((user, _), prompt) in enumerate(zip(turns, prompts)):
            _require_prefix(done, prompt, f"user turn {k + 1}")
            if user.strip() not in prompt[len(done):]:
                raise TemplateError("--version auto: the tokenizer's chat template does not write a user message "
                                    "given as a string (it may expect a list of content parts, as templates of "
                                    "vision models do); pass --version with a named template")
            chunks.append((prompt[len(done):], False))
            done = prompt
            if k == len(fulls):
                break
            _require_prefix(prompt, fulls[k], f"answer {k + 1}")
            # Text a template writes only at the very end of a conversation (Phi-3's final eos) is not the turn's.
            added = fulls[k][len(prompt):]
            kept = len(os.path.commonprefix([fulls[k], prompts[k + 1]])) - len(prompt)
            end = _answer_end(added, kept, turns[k][1], tokenizer)
            chunks.append((added[:end], True))
            done = prompt + added[:end]
        return chunks

    def end_of_turn_token(self, tokenizer) -> str:
        """What the template writes after an answer, through its end-of-turn token (eos when nothing)."""
        answer = self.render_chunks(_PROBE, tokenizer)[1][0]
        tail = answer[answer.find(_PROBE[0][1]) + len(_PROBE[0][1]):]
        return tail or tokenizer.eos_token


AUTO_TEMPLATE = AutoTemplate()


def wrapped_chat_template(tokenizer) -> str:
    """The processor's chat template for `auto`: list content (image parts) becomes `<image>` markers placed
    as training places them, then the model's own template renders the messages."""
    own = tokenizer.chat_template
    if not own:
        raise TemplateError("--version auto: the tokenizer has no chat template to give the processor")
    if own.startswith(_WRAPPED):
        return own
    return (_WRAPPED + "{%- set ns = namespace(messages=[], text='') -%}{%- for message in messages -%}"
            + message_text_jinja()
            + "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text}] -%}{%- endfor -%}"
            + "{%- set messages = ns.messages -%}" + own)


def default_template(tokenizer) -> str:
    """The template for a run with no `--version`, logged once: the model's own chat template (`auto`) when
    its tokenizer has one that renders text turns, else `llava_v1` (LLaVA's, for base models)."""
    reason = "the tokenizer has no chat template"
    if getattr(tokenizer, "chat_template", None):
        try:
            AUTO_TEMPLATE.render_chunks(_PROBE, tokenizer)
            logger.info("conversation template: auto (the model's own chat template; no --version given)")
            return AUTO
        except TemplateError as err:
            reason = f"its chat template cannot be used: {err}"
    logger.info("conversation template: llava_v1 (no --version given and %s; pass --version to choose another)",
                reason)
    return named_template("llava_v1").name

