"""MinHash signatures of shingles and a streaming LSH index, vectorised with numpy and compact in memory.

Signatures (`MinHasher`):

- A text is lowercased and its whitespace collapsed (both optional), then cut into shingles: `k`
  consecutive words (word = run of non-whitespace) or `k` consecutive characters.
- Every shingle is hashed once to 64 bits without a Python-level loop: code points go into a numpy
  polynomial hash (prefix sums modulo 2**64 with a position-independent correction, so a word's hash
  does not depend on where it sits), word hashes are combined `k` at a time, and a murmur3 finaliser
  mixes the bits. All constants come from blake2b of the seed, so signatures are identical across
  processes, runs, platforms and numpy versions (Python's salted `hash()` is never used).
- The permutations are the multiply-add-shift family h(x) = ((a*x + b) mod 2**64) >> 32 over the
  32-bit shingle hash x (Dietzfelbinger 1996). Like (a*x + b) mod p it is 2-independent, but it needs
  no modular reduction: one multiply, one add and a running minimum per (permutation, shingle), and
  the shift commutes with the minimum so it is applied once per permutation. Signatures are uint32.

LSH (`LSHIndex`): `bands x rows` signature values per band are hashed to one 64-bit key per band; a
document whose key matches an earlier kept document's in any band is a candidate duplicate, and with
verification on it counts only if the estimated Jaccard of the pair reaches the threshold.
First come is kept: only documents that were not duplicates enter the index.

Memory per kept document (num_perm = 128): band keys live in one open-addressing numpy table (8-byte
key + 4-byte document number per slot, load kept between 1/4 and 1/2: 24-48 bytes per band), the
verification signature as 16-bit fingerprints in fixed-size blocks (256 bytes, see `SignatureStore`),
the document id as UTF-8 bytes plus an 8-byte offset. No Python object per entry. With the bands
`near_dedup` derives: threshold 0.7 -> 20 bands, ~0.8-1.25 KB per kept document; threshold 0.5 ->
32 bands, ~1.1-1.8 KB. Duplicates cost nothing once dropped.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Literal

import numpy as np

ShingleUnit = Literal["word", "char"]

_U64 = np.uint64
_SHIFT_32 = _U64(32)
_SHINGLE_CHUNK = 4096  # shingles per block of the permutation matrix: bounds its temporary memory
_MAX_SEGMENT = 1 << 20  # code points hashed at once; longer texts are cut at spaces (see _word_hashes)
_SIGNATURE_BLOCK = 1 << 14  # signatures per storage block of the LSH index
_PROBE_WINDOW = 8  # slots read at once per key: at load <= 1/2 nearly every probe ends inside it
_REHASH_CHUNK = 1 << 20  # keys re-placed at once when the table grows: bounds the bookkeeping
_PROBE_OFFSETS = np.arange(_PROBE_WINDOW, dtype=np.int64)


def stable_constants(seed: int, label: str, count: int, odd: bool = False) -> np.ndarray:
    """`count` pseudo-random uint64 from blake2b(seed, label, counter): stable everywhere, forever."""
    out = bytearray()
    counter = 0
    while len(out) < 8 * count:
        out += hashlib.blake2b(f"{seed}:{label}:{counter}".encode(), digest_size=64).digest()
        counter += 1
    values = np.frombuffer(bytes(out[: 8 * count]), dtype="<u8").astype(_U64)
    return values | _U64(1) if odd else values


def mix64(values: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, element-wise: every input bit reaches every output bit."""
    z = values >> _U64(33)
    z ^= values
    z *= _U64(0xFF51AFD7ED558CCD)
    z ^= z >> _U64(33)
    z *= _U64(0xC4CEB9FE1A85EC53)
    z ^= z >> _U64(33)
    return z


def nonzero_keys(keys: np.ndarray) -> np.ndarray:
    """Hash keys for `UInt64Map`, which reserves 0 for empty slots: 0 becomes 1 (a 2**-64 event)."""
    return np.maximum(keys, _U64(1))


def _code_points(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate hashes as its code point instead of raising.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(_U64)


@dataclass(frozen=True, slots=True)
class ShingleConfig:
    unit: ShingleUnit = "word"
    size: int = 5
    lowercase: bool = True
    normalize_whitespace: bool = True  # always true in effect for word shingles


class MinHasher:
    """MinHash signatures (uint32[num_perm]) of a text's shingle set; deterministic for a given seed."""

    def __init__(self, num_perm: int = 128, shingles: ShingleConfig = ShingleConfig(), seed: int = 1):
        if num_perm < 1 or shingles.size < 1:
            raise ValueError("num_perm and the shingle size must be at least 1")
        self.num_perm = num_perm
        self.shingles_config = shingles
        self.seed = seed
        self._a = stable_constants(seed, "perm-a", num_perm, odd=True)[:, None]
        self._b = stable_constants(seed, "perm-b", num_perm)[:, None]
        self._base = int(stable_constants(seed, "poly-base", 1, odd=True)[0])
        self._length_salt = stable_constants(seed, "length", 1)[0]
        self._position = stable_constants(seed, "position", shingles.size, odd=True)  # shingle combiner
        self._powers = np.ones(1, dtype=_U64)  # base**i mod 2**64, grown on demand up to _MAX_SEGMENT
        self._inverse_powers = np.ones(1, dtype=_U64)

    # -- text to shingles ---------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        config = self.shingles_config
        if config.lowercase:
            text = text.lower()
        if config.unit == "word" or config.normalize_whitespace:
            text = " ".join(text.split())
        return text

    def shingles(self, text: str) -> list[str]:
        """The shingles as strings: the reference definition (for tests and for other libraries)."""
        text, size = self.normalize(text), self.shingles_config.size
        units: list[str] = text.split(" ") if self.shingles_config.unit == "word" else list(text)
        units = [u for u in units if u]
        joiner = " " if self.shingles_config.unit == "word" else ""
        if not units:
            return []
        if len(units) < size:  # a text shorter than one shingle is one shingle
            return [joiner.join(units)]
        return [joiner.join(units[i : i + size]) for i in range(len(units) - size + 1)]

    def shingle_hashes(self, text: str) -> np.ndarray:
        """One 64-bit hash per shingle of `shingles(text)`, in the same order, computed without loops."""
        text = self.normalize(text)
        if not text:
            return np.empty(0, dtype=_U64)
        if self.shingles_config.unit == "word":
            units = self._word_hashes(text)
        else:
            units = _code_points(text) * _U64(0x9E3779B97F4A7C15)
        return self._combine(units)

    def _combine(self, units: np.ndarray) -> np.ndarray:
        """Hash each window of `size` consecutive unit hashes: sum of unit * odd constant per position."""
        size = min(self.shingles_config.size, len(units))
        count = len(units) - size + 1
        combined = units[:count] * self._position[0]
        for offset in range(1, size):
            combined += units[offset : offset + count] * self._position[offset]
        return mix64(combined)

    def _word_hashes(self, text: str) -> np.ndarray:
        """Hash of every space-separated word of a normalised text (single spaces, none at the ends)."""
        if len(text) <= _MAX_SEGMENT:
            return self._segment_word_hashes(text)
        # Bound the power tables: hash long texts a segment at a time, cut at a space (a word longer
        # than a whole segment is cut in two, which only changes the shingles around it).
        parts, start = [], 0
        while start < len(text):
            end = start + _MAX_SEGMENT
            if end < len(text):
                space = text.rfind(" ", start, end)
                end = space if space > start else end
            parts.append(self._segment_word_hashes(text[start:end].strip(" ")))
            start = end + 1 if end < len(text) and text[end] == " " else end
        return np.concatenate([p for p in parts if len(p)])

    def _segment_word_hashes(self, text: str) -> np.ndarray:
        points = _code_points(text)
        n = len(points)
        powers, inverse = self._power_tables(n)
        prefix = np.zeros(n + 1, dtype=_U64)
        np.cumsum(points * powers[:n], out=prefix[1:])  # wraps modulo 2**64, as intended
        spaces = np.flatnonzero(points == _U64(32))
        starts = np.concatenate(([0], spaces + 1))
        ends = np.concatenate((spaces, [n]))
        # sum(points[s:e] * base**(i-s)): prefix difference times base**-s (base is odd, so invertible)
        words = (prefix[ends] - prefix[starts]) * inverse[starts]
        words += (ends - starts).astype(_U64) * self._length_salt
        return words  # not mixed yet: _combine mixes each shingle once, after the linear combination

    def _power_tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._powers) < n + 1:
            size = max(n + 1, 2 * len(self._powers))
            inverse_base = pow(self._base, -1, 1 << 64)
            ones = np.ones(1, dtype=_U64)
            # cumprod of uint64 wraps modulo 2**64: exactly the arithmetic the hash is defined in
            self._powers = np.concatenate((ones, np.cumprod(np.full(size - 1, self._base, dtype=_U64))))
            self._inverse_powers = np.concatenate(
                (ones, np.cumprod(np.full(size - 1, inverse_base, dtype=_U64)))
            )
        return self._powers, self._inverse_powers

    # -- shingles to signature ----------------------------------------------------------------------

    def signature(self, text: str) -> np.ndarray | None:
        """uint32[num_perm], or None for a text without a single shingle (nothing to compare)."""
        hashes = self.shingle_hashes(text)
        return self.signature_of_hashes(hashes) if len(hashes) else None

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        x = (hashes >> _SHIFT_32)[None, :]  # the top 32 bits: a*x + b then fits 64 bits
        minimum = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=_U64)
        for start in range(0, x.shape[1], _SHINGLE_CHUNK):
            block = self._a * x[:, start : start + _SHINGLE_CHUNK]
            block += self._b
            np.minimum(minimum, block.min(axis=1), out=minimum)
        return (minimum >> _SHIFT_32).astype(np.uint32)  # the shift is monotone: min, then shift


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """The fraction of permutations on which two signatures agree."""
    return float(np.count_nonzero(first == second)) / len(first)


# -- choosing bands and rows -----------------------------------------------------------------------


def collision_probability(similarity: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """P(two documents of Jaccard `similarity` share at least one band): 1 - (1 - s**r)**b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows) ** bands


def choose_bands_rows(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted areas under the S-curve.

    The false-positive area is the collision probability integrated over similarities below the
    threshold, the false-negative area the miss probability integrated above it. With verification
    on, false positives only cost a signature comparison, so weighting misses more is reasonable."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    grid_low = np.linspace(0.0, threshold, 257)
    grid_high = np.linspace(threshold, 1.0, 257)
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(collision_probability(grid_low, bands, rows), grid_low)
            fn = np.trapezoid(1.0 - collision_probability(grid_high, bands, rows), grid_high)
            error = false_positive_weight * fp + false_negative_weight * fn
            if best is None or error < best[0] - 1e-12:
                best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


# -- compact storage -------------------------------------------------------------------------------


class UInt64Map:
    """Open-addressing hash table uint64 key -> uint32 value in two numpy arrays (no Python objects).

    Keys must already be well-mixed hashes (the low bits pick the slot); 0 marks an empty slot, so
    callers pass keys through `nonzero_keys`.
    Lookups of many keys at once probe in lockstep (linear probing), so a document's band keys cost a
    handful of numpy calls. The table doubles when half full: 12 bytes per slot, 24-48 bytes per key.
    """

    def __init__(self, capacity: int = 1 << 12):
        capacity = 1 << max(4, (capacity - 1).bit_length())
        self._keys = np.zeros(capacity, dtype=_U64)
        self._values = np.zeros(capacity, dtype=np.uint32)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, found): each key's slot if present, else the first empty slot on its probe path.

        Linear probing without deletions: a key is present iff it appears before the first empty slot.
        A window of `_PROBE_WINDOW` slots per key is read at once, which settles nearly every key at
        a load factor of at most 1/2; the rare longer path is walked one slot at a time."""
        mask = len(self._keys) - 1
        window = ((keys & _U64(mask)).astype(np.int64)[:, None] + _PROBE_OFFSETS) & mask
        stored = self._keys[window]
        hit = stored == keys[:, None]
        stop = hit | (stored == 0)
        first = stop.argmax(axis=1)
        rows = np.arange(len(keys))
        slots, found = window[rows, first], hit[rows, first]
        settled = stop[rows, first]
        for i in [] if settled.all() else np.flatnonzero(~settled).tolist():
            slot, key = (int(window[i, -1]) + 1) & mask, keys[i]
            while self._keys[slot] != 0 and self._keys[slot] != key:
                slot = (slot + 1) & mask
            slots[i], found[i] = slot, self._keys[slot] == key
        return slots, found

    def values_at(self, slots: np.ndarray) -> np.ndarray:
        return self._values[slots]

    def get_many(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, found): values are meaningful where found."""
        slots, found = self.probe(keys)
        return self._values[slots], found

    def insert_many(self, keys: np.ndarray, value: int) -> None:
        """Store `keys` (distinct, none present yet) all mapping to `value`."""
        slots, found = self.probe(keys)
        if found.any():
            raise KeyError("insert_many: key already present")
        self.fill(keys, slots, found, value)

    def fill(self, keys: np.ndarray, slots: np.ndarray, found: np.ndarray, value: int) -> None:
        """Store the keys `probe` did not find, mapping to `value`; (slots, found) from that probe, with
        no insertion in between. Saves a second probe when a lookup decides whether to insert."""
        keys, slots = keys[~found], slots[~found]
        if len(keys) == 0:
            return
        if 2 * (self._count + len(keys)) > len(self._keys):
            self._grow()
            slots, _ = self.probe(keys)
        if len(set(slots.tolist())) == len(slots):
            self._keys[slots] = keys
            self._values[slots] = value
            self._count += len(keys)
            return
        for key in keys:  # two new keys share their first empty slot (rare): place them one at a time
            (slot,), (present,) = self.probe(key[None])
            if not present:  # an equal key earlier in this batch may have taken it
                self._keys[slot] = key
                self._values[slot] = value
                self._count += 1

    def _grow(self) -> None:
        occupied = self._keys != 0
        keys, values = self._keys[occupied], self._values[occupied]
        capacity = 2 * len(self._keys)
        # Release the old arrays before allocating the new ones: the peak is the new table plus the
        # live entries (12 bytes each) plus one chunk's bookkeeping.
        del occupied
        self._keys = self._values = np.empty(0, dtype=_U64)
        self._keys = np.zeros(capacity, dtype=_U64)
        self._values = np.zeros(capacity, dtype=np.uint32)
        for start in range(0, len(keys), _REHASH_CHUNK):
            self._place(keys[start : start + _REHASH_CHUNK], values[start : start + _REHASH_CHUNK])

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert absent, distinct keys in rounds: each round the first key to claim an empty slot
        takes it and the others move one slot on, which is what inserting them one by one does."""
        mask = len(self._keys) - 1
        slots = (keys & _U64(mask)).astype(np.int64)
        while len(keys):
            empty = self._keys[slots] == 0
            claimed, first = np.unique(slots[empty], return_index=True)
            winners = np.flatnonzero(empty)[first]
            self._keys[claimed] = keys[winners]
            self._values[claimed] = values[winners]
            rest = np.ones(len(keys), dtype=bool)
            rest[winners] = False
            keys, values, slots = keys[rest], values[rest], (slots[rest] + 1) & mask


class KeyStore:
    """Document ids as UTF-8 in one bytearray plus offsets: ~8 bytes + the id's length per id."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("Q")

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, key: str) -> int:
        self._data += key.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._data))
        return len(self._ends) - 1

    def __getitem__(self, index: int) -> str:
        start = self._ends[index - 1] if index else 0
        return self._data[start : self._ends[index]].decode("utf-8", "surrogatepass")

    @property
    def nbytes(self) -> int:
        return len(self._data) + 8 * len(self._ends)


class SignatureStore:
    """The low 16 bits of every signature value, in fixed-size blocks (growing never copies).

    16-bit fingerprints are enough to estimate Jaccard (b-bit minwise hashing, Li & Koenig 2010):
    two different minima agree on their low 16 bits with probability 2**-16, which raises an
    estimate by (1 - J) / 65536 at most. Half the memory of full 32-bit values: 2 bytes per value."""

    def __init__(self, num_perm: int):
        self.num_perm = num_perm
        self._blocks: list[np.ndarray] = []
        self._count = 0

    def append(self, signature: np.ndarray) -> int:
        row = self._count % _SIGNATURE_BLOCK
        if row == 0:
            self._blocks.append(np.empty((_SIGNATURE_BLOCK, self.num_perm), dtype=np.uint16))
        self._blocks[-1][row] = signature  # numpy keeps the low 16 bits of each uint32
        self._count += 1
        return self._count - 1

    def agreement(self, indices: np.ndarray, signature: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of `signature` with each stored signature in `indices`."""
        fingerprint = signature.astype(np.uint16)
        rows = [self._blocks[i // _SIGNATURE_BLOCK][i % _SIGNATURE_BLOCK] for i in indices.tolist()]
        return np.count_nonzero(np.stack(rows) == fingerprint, axis=1) / self.num_perm

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self._blocks)


# -- the index -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """The earlier kept document a new one collides with; `jaccard` is None without verification."""

    key: str
    jaccard: float | None


class LSHIndex:
    """Streaming LSH over MinHash signatures: `add` keeps the first of each near-duplicate group.

    `verify_threshold`: when set, a band collision counts only if the pair's estimated Jaccard reaches
    it (signatures are then stored, 2 bytes per permutation per kept document); when None, any
    collision counts and no signature is kept."""

    def __init__(self, num_perm: int, bands: int, rows: int, verify_threshold: float | None, seed: int = 1):
        if bands * rows > num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {num_perm}")
        self.num_perm, self.bands, self.rows = num_perm, bands, rows
        self.verify_threshold = verify_threshold
        self._band_multipliers = stable_constants(seed, "band-rows", bands * rows, odd=True).reshape(
            bands, rows
        )
        self._band_salts = stable_constants(seed, "band-salt", bands)
        self._table = UInt64Map()
        self._ids = KeyStore()
        self._signatures = SignatureStore(num_perm) if verify_threshold is not None else None

    def __len__(self) -> int:
        return len(self._ids)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One 64-bit key per band: the band's values times random odd constants, summed mod 2**64.

        No finaliser is needed: signature values are uniform, and an odd multiplier keeps the low
        bits (the table slot) uniform. Pure: callers may compute it elsewhere and pass it to `add`."""
        values = signature[: self.bands * self.rows].astype(_U64).reshape(self.bands, self.rows)
        values *= self._band_multipliers
        keys = values.sum(axis=1, dtype=_U64)
        keys += self._band_salts
        return nonzero_keys(keys)

    def query(self, signature: np.ndarray) -> Match | None:
        """The best earlier kept document this signature is a near-duplicate of, without adding it."""
        return self._match(signature, self.band_keys(signature))[0]

    def add(self, key: str, signature: np.ndarray, band_keys: np.ndarray | None = None) -> Match | None:
        """The earlier kept document `key` duplicates, or None: then `key` is kept and indexed.

        `band_keys`: `self.band_keys(signature)` if already computed (e.g. in a worker process)."""
        if band_keys is None:
            band_keys = self.band_keys(signature)
        match, slots, found = self._match(signature, band_keys)
        if match is not None:
            return match
        index = self._ids.append(key)
        if self._signatures is not None:
            self._signatures.append(signature)
        # A band key an earlier document already holds stays with it (first come); the rest are new.
        self._table.fill(band_keys, slots, found, index)
        return None

    def _match(
        self, signature: np.ndarray, band_keys: np.ndarray
    ) -> tuple[Match | None, np.ndarray, np.ndarray]:
        slots, found = self._table.probe(band_keys)
        if not found.any():
            return None, slots, found
        # A Python set beats np.unique on a few dozen values; ascending order: earlier documents first
        candidates = np.array(sorted(set(self._table.values_at(slots[found]).tolist())), dtype=np.int64)
        if self._signatures is None:
            return Match(self._ids[int(candidates[0])], None), slots, found
        agreement = self._signatures.agreement(candidates, signature)
        best = int(np.argmax(agreement))  # the most similar; ties go to the earliest
        if agreement[best] < self.verify_threshold:
            return None, slots, found
        return Match(self._ids[int(candidates[best])], float(agreement[best])), slots, found

    @property
    def nbytes(self) -> int:
        stored = self._signatures.nbytes if self._signatures is not None else 0
        return self._table.nbytes + self._ids.nbytes + stored
