"""Fast English word and sentence splitting for the heuristic quality filters.

The published quality rules (Gopher, C4, FineWeb) count "words" the way their reference
implementation does: datatrove runs spaCy's English tokenizer, which splits on spaces and then peels
punctuation off each piece ("(hello)," gives "(", "hello", ")", ","), splits a few infixes
("stop-believing", "a/b", "a...b") and keeps some special forms whole ("e.g.", "x.").
`split_words` follows those same rules, written from their description, without spaCy: each
space-separated chunk is split once and the result cached, so a corpus (and above all code, where the
same chunks recur constantly) costs one dictionary lookup per chunk. The result matches spaCy on
ordinary prose; on the benchmark corpus (mostly Python source) about 93% of documents split exactly
alike, and the rest differ on rare forms (runs of quotes, the long tail of spaCy's URL grammar,
regular expressions in code) by a few tokens.

`count_sentences` reproduces spaCy's rule-based sentencizer on those tokens: a new sentence starts at
the first non-punctuation token after a sentence-final mark ("." "!" "?" and their equivalents in other
scripts).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from itertools import chain

# Characters peeled off the front of a chunk one at a time (quotes, brackets, currency, ...).
_PREFIX_CHARS = frozenset(
    "§%=—–,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧$£€¥฿₽₴₩₪₫₹₺₿"
)
# Characters peeled off the end: closing punctuation and quotes (the period has its own rule).
_SUFFIX_CHARS = frozenset(
    ",:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧—–…"
)
# A final period is split after these (and after a lowercase letter or a digit), not after one
# capital: "Mr." and initials stay whole, "etc." and "AB." do not.
_PERIOD_AFTER = frozenset("%²-+…,:;!?()[]{}<>_#*&'\"”“`‘´’»«")
# Units split from a number before them ("10km" gives "10", "km").
_UNIT_SUFFIX = re.compile(
    r"(?<=[0-9])(?:km/h|m/s|mph|kmh|mbar|hPa|km|cm|mm|nm|µm|kg|mg|µg|lb|oz|ft|yd|Pa|MB|KB|GB|TB|kb|gb|tb|mb|%|[$£€¥])$"
)
# Possible split points inside a word; each candidate is checked by `_infix_end`.
_INFIX_CANDIDATE = re.compile(r"[.…+\-*^,–—~:<>=/]")
_QUOTES = frozenset("'\"”“`‘´’")
# Contractions split only when they make up the whole remaining word ("do" + "n't").
_CONTRACTED_WORD = re.compile(r"([^\W\d_]+?)(n['’]t|['’](?:re|ve|ll|m|d))")
# URLs stay whole (their "/" and "-" are not split points), and so do bare domain-like names
# ("os.path", "example.org"), which spaCy's URL rule takes for URLs too.
_URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+|(?:[^\W_](?:[\w-]*[^\W_])?\.)+[a-z]{2,63}")
# Kept whole: a letter with a period ("x."), two-letter abbreviations ("e.g.", "U.S."), common titles.
_SPECIAL = re.compile(
    r"[A-Za-z]\.|[A-Za-z]\.[A-Za-z]\.|(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|Inc|Ltd|Co|Corp|Mt|No|Jan|Feb|Mar|Apr|"
    r"Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.|--|---|and/or"
)
# Emoticons and doubled quotes that spaCy keeps as one token even when its affix rules split them.
_MERGED = frozenset(
    "'' ’’ ): (: :( :) ;) =) (= =( :/ =/ :] [: :| :> :* 8) :)) :(( :-) :-( ;-) :-/ :-] :-| :-> :'( :') "
    "-_- ^_^ >.< ._. <.< >.> @_@ -__- ^__^ :-)) :-(( :-* :-}".split()
)
_HAS_MERGED = re.compile("|".join(map(re.escape, sorted(_MERGED, key=len, reverse=True))))
# Contractions written without an apostrophe, which spaCy's English exceptions split ("can" + "not").
_GLUED = {
    word: (word[:cut], word[cut:])
    for word, cut in (
        ("cannot", 3),
        ("id", 1),
        ("im", 1),
        ("ive", 1),
        ("dont", 2),
        ("cant", 2),
        ("wont", 2),
        ("aint", 2),
        ("isnt", 2),
        ("arent", 3),
        ("wasnt", 3),
        ("werent", 4),
        ("doesnt", 4),
        ("didnt", 3),
        ("hasnt", 3),
        ("havent", 4),
        ("hadnt", 3),
        ("couldnt", 5),
        ("shouldnt", 6),
        ("wouldnt", 5),
        ("mustnt", 4),
        ("thats", 4),
        ("whats", 4),
        ("theres", 5),
        ("heres", 4),
        ("hes", 2),
        ("shes", 3),
        ("youre", 3),
        ("theyre", 4),
        ("youve", 3),
        ("weve", 2),
        ("theyve", 4),
        ("youll", 3),
        ("theyll", 4),
        ("itll", 2),
        ("youd", 3),
        ("theyd", 4),
        ("gonna", 3),
        ("gotta", 3),
        ("whos", 3),
        ("wheres", 5),
        ("hows", 3),
        ("yall", 1),
    )
}
_GLUED.update({word.capitalize(): (a.capitalize(), b) for word, (a, b) in list(_GLUED.items())})

# spaCy's sentencizer ends a sentence after these (Unicode sentence terminals).
SENTENCE_END = frozenset("!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼。꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡")
_HAS_SENTENCE_END = re.compile("[" + re.escape("".join(sorted(SENTENCE_END))) + "]")


@lru_cache(maxsize=1 << 19)
def _split_chunk(chunk: str) -> tuple[str, ...]:
    """One space-free chunk as tokens: prefixes and suffixes peeled off, then infixes split.

    Written with string methods rather than one big regex: a corpus of code has hundreds of thousands
    of distinct chunks, so the cost of a cache miss matters."""
    if chunk.isalnum() and not (chunk[0].isdigit() and not chunk.isdigit()):
        # The common case: a plain word or number ("10km" falls through to the units rule).
        glued = _GLUED.get(chunk)
        return glued if glued else (chunk,)
    prefixes: list[str] = []
    suffixes: list[str] = []
    core = chunk
    while core and not _is_special(core) and core not in _MERGED:
        before = core
        cut = _prefix_length(core)
        if cut and cut < len(core):
            prefixes.append(core[:cut])
            core = core[cut:]
            if _is_special(core):
                break
        cut = _suffix_length(core)
        if cut and cut < len(core):
            suffixes.append(core[-cut:])
            core = core[:-cut]
        elif cut and not prefixes:
            break  # the chunk is nothing but one piece of punctuation ("," or "...")
        if core == before:
            break
    tokens = prefixes
    if core:
        if core.isalnum():
            tokens.extend(_GLUED.get(core, (core,)))  # nothing left to split but a glued contraction
        elif _is_special(core) or core in _MERGED:
            tokens.append(core)
        elif core in _GLUED:
            tokens.extend(_GLUED[core])
        elif _URL.fullmatch(core):
            tokens.append(core)
        elif contracted := _CONTRACTED_WORD.fullmatch(core):
            tokens.extend(contracted.groups())
        else:
            _split_infixes(core, tokens)
    tokens.extend(reversed(suffixes))
    if len(tokens) > 1 and _HAS_MERGED.search(chunk):
        tokens = _merge_emoticons(tokens)
    return tuple(tokens)


def _is_special(core: str) -> bool:
    # Every special form holds a period, a hyphen or a slash: test for those before the regex.
    return ("." in core or "-" in core or "/" in core) and _SPECIAL.fullmatch(core) is not None


def _prefix_length(core: str) -> int:
    first = core[0]
    if first == ".":
        run = len(core) - len(core.lstrip("."))
        return run if run > 1 else 0
    if first in _PREFIX_CHARS or first == "…":
        return 1
    if first == "+" and not (len(core) > 1 and core[1].isdigit()):
        return 1
    return 0


def _suffix_length(core: str) -> int:
    last = core[-1]
    if last in _SUFFIX_CHARS:
        return 1
    size = len(core)
    if last == ".":
        if size > 1:
            before = core[-2]
            if before == ".":
                return size - len(core.rstrip("."))  # an ellipsis
            if before.isdigit() or before.islower() or before in _PERIOD_AFTER:
                return 1
            if size > 2 and before.isupper() and core[-3].isupper():
                return 1
        return 0
    if size > 2 and last in "sS" and core[-2] in "'’" and core[-3].isalpha():
        return 2  # "it's" gives "it", "'s"
    if last == "+" and size > 1 and core[-2].isdigit():
        return 1
    if size > 1 and (last.isalpha() or last in "%$£€¥"):
        unit = _UNIT_SUFFIX.search(core, max(0, size - 5))
        if unit:
            return unit.end() - unit.start()
    return 0


def _split_infixes(core: str, tokens: list[str]) -> None:
    """Appends `core` split at its infixes: ellipses, arithmetic between digits, hyphens and
    : < > = / before a letter, a comma between letters, a period between lower and upper case."""
    start = skip = 0
    last = len(core) - 1
    for candidate in _INFIX_CANDIDATE.finditer(core):
        i = candidate.start()
        if i < skip or i == last:
            continue  # inside an infix already found, or at the end
        if i == 0:
            if core[0] == "." and core[1] == ".":
                skip = _infix_end(core, 0)  # a leading ellipsis is no split point, nor is its tail
            continue
        end = _infix_end(core, i)
        if end:
            tokens.append(core[start:i])
            tokens.append(core[i:end])
            start = skip = end
    if start < len(core):
        tokens.append(core[start:])


def _infix_end(core: str, i: int) -> int:
    """Where the infix starting at `core[i]` ends, or 0 when `core[i]` is no split point."""
    char, after = core[i], core[i + 1]
    if char == "." and after == ".":
        return len(core) - len(core[i:].lstrip("."))  # an ellipsis: the whole run of periods
    before = core[i - 1]
    if char == ".":
        if (before.islower() or before in _QUOTES) and (after.isupper() or after in _QUOTES):
            return i + 1
        return 0
    if char == "…":
        return i + 1
    if char in "+-*^" and before.isdigit() and (after.isdigit() or after == "-"):
        return i + 1  # arithmetic between numbers
    if char in "+*^":
        return 0
    if char == ",":
        return i + 1 if before.isalpha() and after.isalpha() else 0
    if char in "-–—~":
        end = i + 1
        if char == "-":
            while end < len(core) and end - i < 3 and core[end] == "-":
                end += 1
        if end < len(core) and before.isalnum() and core[end].isalpha():
            return end
        return 0
    # one of : < > = /
    return i + 1 if before.isalnum() and after.isalpha() else 0


def _merge_emoticons(tokens: list[str]) -> list[str]:
    merged = [tokens[0]]
    for token in tokens[1:]:
        if merged[-1] + token in _MERGED:
            merged[-1] += token
        else:
            merged.append(token)
    return merged


def split_words(text: str) -> list[str]:
    """The words (and punctuation tokens) of `text`, as spaCy's English tokenizer would give them."""
    return list(chain.from_iterable(map(_split_chunk, text.split())))


@lru_cache(maxsize=1 << 16)
def is_punctuation(token: str) -> bool:
    """True when every character is Unicode punctuation (spaCy's `is_punct`)."""
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def count_sentences(text: str) -> int:
    """How many sentences spaCy's sentencizer finds in `text` (0 for blank text)."""
    tokens = split_words(text)
    if not tokens:
        return 0
    # Fast path: no terminal mark anywhere but in the last token means one sentence.
    if not _HAS_SENTENCE_END.search(text, 0, max(0, len(text.rstrip()) - len(tokens[-1]))):
        return 1
    sentences, seen_end = 1, False
    # Split on single spaces: an empty piece is a run of extra spaces, which spaCy keeps as a
    # whitespace token, and a token that is not punctuation starts a sentence after a full stop.
    for piece in text.split(" "):
        for token in _split_chunk(piece) if piece else (" ",):
            if token in SENTENCE_END:
                seen_end = True
            elif seen_end and not is_punctuation(token):
                sentences += 1
                seen_end = False
    return sentences


# Characters that make a token "only punctuation" for the Gopher word counts: ASCII punctuation and
# symbols, plus anything Unicode files as punctuation (P*) or as a control/format character (C*).
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
SYMBOL, ALPHA, OTHER = 0, 1, 2  # word shapes: punctuation only; has a letter; anything else (digits)


@lru_cache(maxsize=1 << 18)
def word_shape(token: str) -> int:
    """SYMBOL for a token made only of punctuation, ALPHA if it holds a letter, else OTHER."""
    if token.isalpha() or any(ch.isalpha() for ch in token):
        return ALPHA
    for ch in token:
        if ch not in _ASCII_PUNCTUATION and unicodedata.category(ch)[0] not in "PC":
            return OTHER
    return SYMBOL


@lru_cache(maxsize=1 << 18)
def content_length(token: str) -> int:
    """The token's length, or 0 for a punctuation-only token (mean word length ignores those)."""
    return 0 if word_shape(token) == SYMBOL else len(token)


class _LastSplit:
    """The words of the most recent text: the steps of one chain look at the same document in turn,
    so the second and third ask for the split the first one made."""

    __slots__ = ("text", "words")

    def __init__(self) -> None:
        self.text: str | None = None
        self.words: list[str] = []


_LAST = _LastSplit()


def words_of(text: str) -> list[str]:
    """`split_words(text)`, reusing the previous call's result for the same text object.

    The list is shared: callers must not modify it."""
    if text is not _LAST.text:
        _LAST.words = split_words(text)
        _LAST.text = text
    return _LAST.words


def clear_caches() -> None:
    """Forget every cached split and word shape (for benchmarks that must start cold)."""
    for cached in (_split_chunk, is_punctuation, word_shape, content_length):
        cached.cache_clear()
    _LAST.text, _LAST.words = None, []
