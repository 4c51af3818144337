"""Chat messages as turns + images: the one reader for every place messages come from.

    data files     {"messages": [...], "images": [...]} (OpenAI, TRL, LLaMA-Factory): `data.read_messages`
    preference     TRL's conversational prompt and chosen/rejected messages: `data.preference_parts`
    requests       the API's `messages`, which the web chat and the CLI send too: `serve.chat_request`

A message is `{"role", "content"}`; content is a string or a list of parts, each read by the part
reader registered for its `type` (`PART_READERS`): text, `image` (the image listed apart in the
record, as TRL and LLaMA-Factory write it) or `image_url` (OpenAI: the image inside the part, only a
request may send one). Where each image's `<image>` marker goes is `templates.turn_text`.

Add a content part: one `@part_reader("type")` function here; data files and the API read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .templates import turn_text

# A role as the turns name it: system, user or assistant ("developer" is OpenAI's newer "system").
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Piece:
    """What one content part holds: text, or an image (with its `source` when the part carries it inline)."""

    text: str | None = None
    image: bool = False
    source: object = None


PART_READERS: dict[str, Callable[[dict], Piece | None]] = {}


def part_reader(kind: str):
    """Register the reader of content parts of type `kind`; it returns a `Piece`, or None when the part is
    malformed."""

    def register(read: Callable[[dict], Piece | None]):
        PART_READERS[kind] = read
        return read

    return register


@part_reader("text")
def _text_part(part: dict) -> Piece | None:
    return Piece(text=part["text"]) if isinstance(part.get("text"), str) else None


@part_reader("image")
def _listed_image_part(part: dict) -> Piece:
    return Piece(image=True)  # TRL / LLaMA-Factory / transformers: the image is in the record's `images`


@part_reader("image_url")
def _image_url_part(part: dict) -> Piece:
    image_url = part.get("image_url")  # OpenAI: {"url": ...}; some clients send the URL itself
    return Piece(image=True, source=image_url.get("url") if isinstance(image_url, dict) else image_url)


@dataclass(frozen=True)
class Problem:
    """Why messages cannot be read: the checks' `kind`, a message, and where it is in OpenAI's error form
    (`param`, `code`) for the API."""

    kind: str
    message: str
    param: str
    code: str


@dataclass
class Turns:
    """Messages read: the leading system text, the (role, text) turns in order, the inline images' loaded
    values in marker order, and the problems (the turns are then incomplete)."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    images: list = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _content_pieces(content, images_inline: bool) -> list[Piece] | None:
    """The parts' pieces (None for a string); TypeError when a part is unreadable, or carries its image
    where the images are listed apart (or the reverse)."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise TypeError
    pieces = [PART_READERS[p.get("type")](p) if p.get("type") in PART_READERS else None for p in content]
    if any(piece is None or (piece.image and (piece.source is not None) != images_inline) for piece in pieces):
        raise TypeError
    return pieces


def read_messages(messages: list, images_inline: bool, load_image: Callable[[object, str], object] = None) -> Turns:
    """Read `messages` into turns + images. `images_inline`: images come inside their parts (a request;
    `load_image(source, param)` turns each into the image the prompt holds) rather than listed apart (a
    data record). Leading system messages become `system` (joined by lines); the order of the user and
    assistant turns is left to the caller's rules."""
    read, system = Turns(), []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = ROLES.get(message.get("role")) if isinstance(message, dict) else None
        if role is None:
            found = message.get("role") if isinstance(message, dict) else None
            read.problems.append(Problem("bad_roles", f"message {i} has role {found!r}; expected 'system', 'user' or "
                                                      "'assistant'", f"{where}.role", "invalid_messages"))
            continue
        content = message.get("content")
        try:
            pieces = _content_pieces(content, images_inline)
        except TypeError:
            allowed = "image_url, image_url: {url}" if images_inline else "image"
            read.problems.append(Problem("bad_conversations", f"message {i} has content {str(content)[:80]!r}; "
                                         f"expected a string or a list of {{type: text, text}} / {{type: {allowed}}} "
                                         "parts", f"{where}.content", "invalid_content"))
            continue
        images = [(k, p) for k, p in enumerate(pieces or []) if p.image]
        if images and role != "user":
            read.problems.append(Problem("image_in_answer", f"message {i} ({message['role']}) holds an image; expected "
                                         "images in user messages only", f"{where}.content[{images[0][0]}]",
                                         "invalid_content"))
            continue
        if images_inline and not read.problems:  # the first problem is the one a request is refused for
            read.images += [load_image(p.source, f"{where}.content[{k}].image_url.url") for k, p in images]
        text = turn_text(content if pieces is None else [None if p.image else p.text for p in pieces], images_inline)
        if role == "system" and read.turns:
            read.problems.append(Problem("bad_roles", f"message {i} is a system message after the conversation "
                                                      "started; expected the system message first", f"{where}.role",
                                         "invalid_messages"))
        elif role == "system":
            system.append(text)
        else:
            read.turns.append((role, text))
    read.system = "\n".join(system) if system else None
    return read
