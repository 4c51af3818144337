"""Generated ids to answer text, the one place every decoding path goes through (`inference.generate_batch`,
hence `eval.generate` and the CLI; the serving engine), and the room an answer needs.

A cut at `max_new_tokens` can fall inside a character: a CJK character or an emoji is 3-4 UTF-8 bytes, and
a byte-fallback tokenizer (Llama-2/TinyLlama, `<0xE7>`) or a byte-level BPE (GPT-2/Qwen style) gives each
byte, or a part of a character, a token of its own. Decoded as is, the unfinished character becomes
U+FFFD (and with byte fallback the whole trailing run of byte tokens does: "貓" followed by half of "咪"
decodes to four U+FFFD), which the PTB tokenizer of the caption metrics calls "Untokenizable". The cut
drops that unfinished character; an invalid byte the model produced elsewhere is left as it is.
"""
from __future__ import annotations

import json
import re
import weakref

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens
_UTF8_MAX = 4  # bytes of the longest character
_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its byte reading, found once


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as inside a token, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_reader(tokenizer):
    """A function token -> its bytes, or None for a token that is text (a piece that holds whole characters).

    Byte fallback: only `<0xNN>` tokens are bytes. Byte-level BPE (its decoder is ByteLevel): every token is.
    A tokenizer of neither kind (a slow one, a word-level vocabulary) never splits a character: None.
    """
    if tokenizer in _KINDS:
        return _KINDS[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder")) if backend is not None else ""
    if "ByteLevel" in decoder:
        alphabet = _byte_level_alphabet()

        def reader(token: str):
            return bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else None
    elif "ByteFallback" in decoder or "<0xE7>" in tokenizer.get_vocab():
        def reader(token: str):
            match = _BYTE_FALLBACK.fullmatch(token)
            return bytes([int(match[1], 16)]) if match else None
    else:
        reader = None
    _KINDS[tokenizer] = reader
    return reader


def unfinished_bytes(data: bytes) -> int:
    """How many bytes at the end of `data` begin a character that the bytes do not finish (0 to 3)."""
    for back in range(1, min(_UTF8_MAX, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: the character began further back
            continue
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if back < needed else 0
    return 0


def complete_ids(tokenizer, ids: list[int]) -> tuple[list[int], int]:
    """`ids` without the tokens of a trailing unfinished character, and how many of its bytes are left in a
    token that also holds text before it (byte-level BPE only; such a token is kept, see `decode_answer`)."""
    reader = _byte_reader(tokenizer)
    if reader is None or not ids:
        return list(ids), 0
    tail_tokens = tokenizer.convert_ids_to_tokens(list(ids[-_UTF8_MAX:]))
    pieces = []  # the bytes of the trailing byte tokens, last token first
    for token in reversed(tail_tokens):
        data = reader(token) if isinstance(token, str) else None
        if data is None:
            break
        pieces.append(data)
    tail = b"".join(reversed(pieces))
    unfinished = unfinished_bytes(tail)
    kept = list(ids)
    for data in pieces:  # drop whole tokens made only of the unfinished character's bytes
        if unfinished < len(data) or not unfinished:
            break
        unfinished -= len(data)
        kept.pop()
    return kept, unfinished


def decode_answer(tokenizer, ids: list[int]) -> str:
    """The answer text of generated `ids` (stop and padding tokens already removed), special tokens skipped,
    stripped, never ending in a character cut in half by the token limit."""
    kept, unfinished = complete_ids(tokenizer, ids)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if unfinished:
        # a byte-level token holds text and the start of the cut character, which decodes to one U+FFFD
        text = text.removesuffix("\ufffd")
    return text.strip()


def answer_room(longest_answer_tokens: int, margin: int = 4) -> int:
    """max_new_tokens for answers as long as the longest training answer: its tokens, the stop token, a margin."""
    return longest_answer_tokens + 1 + margin


def longest_answer_tokens(tokenizer, samples: list[dict]) -> int:
    """The most tokens any assistant turn of `samples` (LLaVA `conversations` or `messages`) takes alone."""
    longest = 0
    for sample in samples:
        turns = sample.get("conversations") or sample.get("messages") or []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from", turn.get("role")) not in ("gpt", "assistant"):
                continue
            value = turn.get("value", turn.get("content"))
            if isinstance(value, str):
                longest = max(longest, len(tokenizer.encode(value, add_special_tokens=False)))
    return longest
