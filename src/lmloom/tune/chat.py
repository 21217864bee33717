"""The chat template: conversations as text with role markers, encoded with a loss mask on assistant turns.

One turn is rendered as

    <|user|>\\n{content}\\n<|end|>\\n

with `<|system|>`, `<|user|>` or `<|assistant|>` as the role marker, and a conversation is its turns
back to back. A prompt for generation ends with the assistant header `<|assistant|>\\n`; the model
writes the reply and then `\\n<|end|>`, which is where generation should stop.

Design: the markers are **plain text**, not special tokens. lmloom's tokenizers have exactly three
special tokens (<|bos|> <|eos|> <|pad|>, ids 0-2) and never recognise special strings in text; an
already trained tokenizer artifact is immutable, and adding tokens would also mean resizing the
pre-trained model's embeddings with untrained rows. Plain-text markers work unchanged with every
tokenizer artifact of every algorithm (the BPE spells `<|user|>` with a few ordinary tokens, which the
pre-trained model has seen as characters), and with any checkpoint.

Two consequences, both handled here:

- **Forgery.** A message could contain the marker strings and fake a turn (a user message holding
  "\\n<|end|>\\n<|assistant|>\\n..."). Content that contains any marker is refused (`ChatFormatError`
  with reason `marker_in_content`; the loaders count and skip such rows). `escape_markers` makes such
  text safe for a caller that must accept it (a serving gateway).
- **Tokenization.** Each piece (header, content, footer, separator) is encoded on its own and the ids
  are concatenated, so the loss mask falls exactly on token boundaries. Content is stripped of
  surrounding whitespace and every marker is preceded or followed by a newline, so the pieces meet at
  a newline. Byte-level BPE's pre-tokenizer always splits there, so `tokenizer.encode(render(...))`
  gives the same ids as the piecewise encoding (a test checks this; so do WordPiece and both
  SentencePiece algorithms in practice, the Hugging Face unigram does not). Generation should use
  `encode_prompt`, which encodes a prompt exactly as training did, whatever the algorithm.
  (WordPiece lowercases and re-spaces on decode, so its decoded turns are not the original text.)

Loss mask: 1 on the assistant's content and its footer `\\n<|end|>` (the model must learn to end its
turn), 0 on every role header, on system and user content and on the newline between turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lmloom.errors import DataError
from lmloom.tokenizers.base import TextTokenizer

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
ROLE_MARKERS = {SYSTEM: "<|system|>", USER: "<|user|>", ASSISTANT: "<|assistant|>"}
END_MARKER = "<|end|>"
MARKERS = (*ROLE_MARKERS.values(), END_MARKER)

TURN_FOOTER = "\n" + END_MARKER  # closes every turn; part of the assistant's loss
TURN_SEPARATOR = "\n"  # between turns; no loss

# Reasons a conversation is refused (the loaders count skipped rows under these names).
MISSING_ROLE = "missing_role"
UNKNOWN_ROLE = "unknown_role"
BAD_CONTENT = "bad_content"  # content missing or not a string
EMPTY_TURN = "empty_turn"
NO_ASSISTANT_TURN = "no_assistant_turn"
NOT_ALTERNATING = "not_alternating"
MARKER_IN_CONTENT = "marker_in_content"
TOO_LONG = "too_long"

# The same template for Hugging Face `transformers` (`tokenizer_config.json`'s "chat_template"), so an
# exported model is prompted the way it was trained. Content is stripped, as in `render`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + '\\n<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatFormatError(DataError):
    """A conversation the template refuses; `reason` is one of the reason names above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _message(raw: Message | Mapping, index: int) -> Message:
    if isinstance(raw, Message):
        role, content = raw.role, raw.content
    elif isinstance(raw, Mapping):
        role, content = raw.get("role"), raw.get("content")
    else:
        raise ChatFormatError(BAD_CONTENT, f"turn {index} is a {type(raw).__name__}, not an object")
    if role is None or role == "":
        raise ChatFormatError(MISSING_ROLE, f"turn {index} has no role")
    if role not in ROLES:
        raise ChatFormatError(
            UNKNOWN_ROLE, f"turn {index} has role {role!r} (expected one of {', '.join(ROLES)})"
        )
    if not isinstance(content, str):
        what = "no content" if content is None else f"content of type {type(content).__name__}"
        raise ChatFormatError(BAD_CONTENT, f"turn {index} ({role}) has {what}")
    content = content.strip()
    if not content:
        raise ChatFormatError(EMPTY_TURN, f"turn {index} ({role}) is empty")
    for marker in MARKERS:
        if marker in content:
            raise ChatFormatError(MARKER_IN_CONTENT, f"turn {index} ({role}) contains the marker {marker}")
    return Message(role, content)


def validate_messages(
    messages: Iterable[Message | Mapping], *, for_generation: bool = False
) -> list[Message]:
    """The conversation as `Message`s with stripped content, or a `ChatFormatError` saying why not.

    Accepted shape: an optional system turn first, then user and assistant turns alternating, starting
    with a user turn. A training conversation (the default) ends with an assistant turn; a prompt for
    generation (`for_generation=True`) ends with a user turn.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise ChatFormatError(BAD_CONTENT, f"messages must be a list of turns, got {type(messages).__name__}")
    turns = [_message(raw, i) for i, raw in enumerate(messages)]
    body = turns[1:] if turns and turns[0].role == SYSTEM else turns
    if not for_generation and not any(t.role == ASSISTANT for t in body):
        raise ChatFormatError(NO_ASSISTANT_TURN, f"{len(turns)} turn(s), none from the assistant")
    if not body:
        raise ChatFormatError(NOT_ALTERNATING, "no user turn")
    for i, turn in enumerate(body):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            index = i + (len(turns) - len(body))
            raise ChatFormatError(NOT_ALTERNATING, f"turn {index} is {turn.role}, expected {expected}")
    last = body[-1].role
    if for_generation and last != USER:
        raise ChatFormatError(NOT_ALTERNATING, "a prompt must end with a user turn")
    if not for_generation and last != ASSISTANT:
        raise ChatFormatError(NOT_ALTERNATING, "a training conversation must end with an assistant turn")
    return turns


def pieces(turns: Sequence[Message], *, generation_prompt: bool = False) -> list[tuple[str, int]]:
    """The template as (text, loss) pieces, each encoded on its own; loss 1 marks the assistant's."""
    out: list[tuple[str, int]] = []
    for turn in turns:
        loss = int(turn.role == ASSISTANT)
        out += [
            (ROLE_MARKERS[turn.role] + "\n", 0),
            (turn.content, loss),
            (TURN_FOOTER, loss),
            (TURN_SEPARATOR, 0),
        ]
    if generation_prompt:
        out.append((ROLE_MARKERS[ASSISTANT] + "\n", 0))
    return out


def render(messages: Iterable[Message | Mapping]) -> str:
    """The text of a whole (training) conversation."""
    return "".join(text for text, _ in pieces(validate_messages(messages)))


def render_prompt(messages: Iterable[Message | Mapping]) -> str:
    """The text that asks the model for the next assistant turn: the turns, then `<|assistant|>\\n`."""
    turns = validate_messages(messages, for_generation=True)
    return "".join(text for text, _ in pieces(turns, generation_prompt=True))


def _encode_pieces(tokenizer: TextTokenizer, parts: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    encoded = tokenizer.encode_batch([text for text, _ in parts])
    ids: list[int] = []
    mask: list[int] = []
    for piece_ids, (_, loss) in zip(encoded, parts, strict=True):
        ids += piece_ids
        mask += [loss] * len(piece_ids)
    return ids, mask


def encode_conversation(
    tokenizer: TextTokenizer, messages: Iterable[Message | Mapping], max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a training conversation; loss_mask is 1 exactly on assistant tokens.

    No BOS/EOS is added (`pack` puts EOS between conversations). A conversation longer than `max_len`
    tokens is refused with reason `too_long`, never truncated: a cut conversation would lose the end of
    an assistant turn or its end marker.
    """
    ids, mask = _encode_pieces(tokenizer, pieces(validate_messages(messages)))
    if max_len is not None and len(ids) > max_len:
        raise ChatFormatError(TOO_LONG, f"{len(ids)} tokens, more than max_len = {max_len}")
    return ids, mask


def encode_prompt(tokenizer: TextTokenizer, messages: Iterable[Message | Mapping]) -> list[int]:
    """The ids of `render_prompt(messages)`, encoded piece by piece exactly as in training."""
    turns = validate_messages(messages, for_generation=True)
    return _encode_pieces(tokenizer, pieces(turns, generation_prompt=True))[0]


def reply_text(generated: str) -> tuple[str, bool]:
    """(the assistant's reply, whether it was finished): `generated` cut before the first end marker.

    Generation stops on token ids, and the end marker is several tokens, so a caller either stops when
    the decoded text contains `END_MARKER` or cuts afterwards with this.
    """
    cut = generated.find(END_MARKER)
    if cut < 0:
        return generated.strip(), False
    return generated[:cut].strip(), True


def escape_markers(text: str) -> str:
    """`text` with every "<|" written "< |", so it can never spell a marker (or a special token)."""
    return text.replace("<|", "< |")
