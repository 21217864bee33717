"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017, the honest-but-curious variant without
dropouts): the server learns the sum of the clients' updates and nothing else about any one of them.

Each round every client makes a fresh X25519 key pair and publishes the public half through the server.
Clients i and j derive the same 32-byte seed s_ij from their X25519 shared secret (HKDF-SHA256, bound to
the round and the pair), expand it with AES-256-CTR into a uniform uint32 mask m_ij, and send

    y_i = enc(x_i) + sum_{j > i} m_ij - sum_{j < i} m_ij     (mod 2^32)

where enc is fixed-point: round(clip(x, +-clip_range) * scale) as a two's-complement uint32. Every
mask appears once with + and once with -, so sum_i y_i = sum_i enc(x_i) (mod 2^32), which decodes to the
sum of the updates to within n / (2 * scale) per coordinate; each y_i alone is uniformly distributed.

Not covered (the full protocol's other half): a client that drops out after masking leaves its masks
in the sum, so the round fails closed instead of being recovered by secret-shared seeds; and the public
keys are relayed by the server unsigned, so a server that substitutes keys (an active attacker) could
unmask a client. Both are limits of this implementation, stated in the README.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lmloom.errors import SecurityError

MODULUS_BITS = 32
DEFAULT_SCALE = 2.0**20  # fixed-point resolution ~1e-6
DEFAULT_CLIP = 8.0  # |coordinate| bound before encoding; 3 clients * 8 * 2^20 stays below 2^31


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh key pair for one round: (private key, raw 32-byte public key)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def pair_seed(
    private: X25519PrivateKey, own_id: int, peer_id: int, peer_public: bytes, context: bytes
) -> bytes:
    """The seed clients own_id and peer_id share: HKDF over their X25519 secret, bound to the pair and round."""
    if own_id == peer_id:
        raise ValueError("a client shares no mask with itself")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecurityError(f"client {peer_id}'s public key is not a valid X25519 key: {exc}") from None
    low, high = sorted((own_id, peer_id))
    info = b"lmloom-secagg-mask/v1|" + context + f"|{low}|{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_stream(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint32 values from AES-256-CTR keyed by the seed (a PRG only the pair can run)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    return np.frombuffer(encryptor.update(b"\x00" * (4 * n)) + encryptor.finalize(), dtype="<u4").copy()


def encode(x: np.ndarray, scale: float = DEFAULT_SCALE, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Fixed point: round(clip(x) * scale) as two's-complement uint32."""
    q = np.rint(np.clip(np.asarray(x, dtype=np.float64), -clip, clip) * scale).astype(np.int64)
    return (q & 0xFFFFFFFF).astype(np.uint32)


def decode(q: np.ndarray, scale: float = DEFAULT_SCALE) -> np.ndarray:
    """Inverse of `encode` (for a sum too, as long as it stays within +-2^31 / scale)."""
    return np.asarray(q, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


def mask_update(
    x: np.ndarray,
    own_id: int,
    private: X25519PrivateKey,
    public_keys: dict[int, bytes],
    context: bytes,
    scale: float = DEFAULT_SCALE,
    clip: float = DEFAULT_CLIP,
) -> np.ndarray:
    """y_i = enc(x_i) + sum_{j>i} m_ij - sum_{j<i} m_ij (mod 2^32), over every other client j in public_keys."""
    y = encode(x, scale, clip)
    for peer_id, peer_public in sorted(public_keys.items()):
        if peer_id == own_id:
            continue
        m = mask_stream(pair_seed(private, own_id, peer_id, peer_public, context), y.size)
        y = y + m if peer_id > own_id else y - m  # uint32 arithmetic wraps mod 2^32
    return y


def aggregate(masked: list[np.ndarray], scale: float = DEFAULT_SCALE) -> np.ndarray:
    """The sum of the clients' updates from their masked vectors (all of them: masks cancel only in the full sum)."""
    total = np.zeros_like(masked[0], dtype=np.uint32)
    for y in masked:
        total = total + y
    return decode(total, scale)


def check_range(n_clients: int, scale: float = DEFAULT_SCALE, clip: float = DEFAULT_CLIP) -> None:
    """The decoded sum must not overflow the int32 range."""
    if n_clients * clip * scale >= 2 ** (MODULUS_BITS - 1):
        raise ValueError(
            f"{n_clients} clients x clip {clip} x scale {scale:g} overflows the 32-bit sum; lower scale or clip"
        )
