"""What runs inside a client (local AdamW steps on its own shard), what the server evaluates, and the
centralised baseline the federated run is compared with. Weights travel as one flat float32 vector.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from lmloom.config import StrictConfig
from lmloom.errors import DataError
from lmloom.models.decoder import Decoder, DecoderConfig


class FederatedConfig(StrictConfig):
    """One federated run; the server holds it and sends it to every client, so all agree on it."""

    model: dict = Field(
        default_factory=lambda: {
            "vocab_size": 256,
            "seq_len": 64,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
        },
        description="DecoderConfig fields",
    )
    clients: int = Field(3, ge=2, description="clients per round (all of them: no sampling)")
    rounds: int = Field(8, ge=1)
    local_steps: int = Field(10, ge=1, description="AdamW steps per client per round")
    batch_size: int = Field(8, ge=1, description="sequences per local step")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = Field(0, ge=0, description="model initialisation and each client's window order")
    secure: bool = Field(True, description="pairwise-mask secure aggregation: the server sees only the sum")
    dp_clip: float = Field(0.0, ge=0, description="clip each client's update to this L2 norm (0 = no DP)")
    dp_noise: float = Field(
        0.0,
        ge=0,
        description="noise multiplier z: the summed update carries N(0, (z*dp_clip)^2) per coordinate; each "
        "client adds its 1/sqrt(clients) share (distributed DP, meaningful with secure aggregation)",
    )
    eval_windows: int = Field(64, ge=1, description="validation windows the server evaluates")
    fixed_point_scale: float = Field(2.0**20, gt=0)
    fixed_point_clip: float = Field(8.0, gt=0)

    def decoder(self) -> DecoderConfig:
        return DecoderConfig.model_validate(self.model)


def load_tokens(path) -> np.ndarray:
    """A token file: a .npy integer array (loaded without pickle)."""
    tokens = np.load(path, allow_pickle=False)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(
            f"{path}: expected a 1-D integer array of token ids, got {tokens.dtype} {tokens.shape}"
        )
    return tokens.astype(np.int64)


def init_model(cfg: FederatedConfig) -> Decoder:
    torch.manual_seed(cfg.seed)
    return Decoder(cfg.decoder())


def get_vector(model: torch.nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)


def set_vector(model: torch.nn.Module, vector: np.ndarray) -> None:
    with torch.no_grad():
        # A copy: vector_to_parameters makes the parameters views of the tensor it is given.
        flat = torch.tensor(np.asarray(vector, dtype=np.float32))
        torch.nn.utils.vector_to_parameters(flat, model.parameters())


def sample_batch(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
    if tokens.size < seq_len + 1:
        raise DataError(f"a shard of {tokens.size} tokens is shorter than one window of {seq_len + 1}")
    starts = rng.integers(0, tokens.size - seq_len, size=batch)
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def build_optimizer(model: torch.nn.Module, cfg: FederatedConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def train_steps(
    model, optimizer, tokens: np.ndarray, rng, steps: int, batch: int, cfg: FederatedConfig
) -> float:
    """`steps` AdamW steps on windows drawn from `tokens`; the mean training loss."""
    model.train()
    seq_len = cfg.decoder().seq_len
    total = 0.0
    for _ in range(steps):
        x, y = sample_batch(tokens, rng, batch, seq_len)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        total += float(loss.detach())
    return total / steps


@torch.no_grad()
def val_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, max_windows: int) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows of `tokens`."""
    model.eval()
    n = min(max_windows, (tokens.size - 1) // seq_len)
    if n < 1:
        raise DataError(f"validation tokens ({tokens.size}) are shorter than one window of {seq_len + 1}")
    rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    losses = [
        float(
            model(
                torch.from_numpy(rows[i : i + 16, :-1].copy()), torch.from_numpy(rows[i : i + 16, 1:].copy())
            )
        )
        * len(rows[i : i + 16])
        for i in range(0, n, 16)
    ]
    return sum(losses) / n


def privatize(
    update: np.ndarray, cfg: FederatedConfig, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, float]:
    """Clip the update to dp_clip (L2) and add this client's share of the Gaussian noise; (update, its norm before)."""
    norm = float(np.linalg.norm(update))
    if cfg.dp_clip <= 0:
        return update, norm
    clipped = update * min(1.0, cfg.dp_clip / max(norm, 1e-12))
    if cfg.dp_noise > 0:
        # OS entropy, never the run's seed: noise the server could regenerate would protect nothing.
        rng = rng or np.random.default_rng()
        std = cfg.dp_noise * cfg.dp_clip / math.sqrt(cfg.clients)
        clipped = clipped + rng.normal(0.0, std, size=clipped.shape)
    return clipped.astype(np.float32), norm


def train_centralised(cfg: FederatedConfig, shards: list[np.ndarray], val: np.ndarray) -> dict:
    """The baseline: one model, rounds * local_steps AdamW steps of clients * batch_size sequences each, drawn
    from all shards together: the same optimizer steps per model and the same tokens as the federated run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each federated process runs; more threads than free cores thrash
    try:
        return _train_centralised(cfg, shards, val)
    finally:
        torch.set_num_threads(threads)


def _train_centralised(cfg: FederatedConfig, shards: list[np.ndarray], val: np.ndarray) -> dict:
    model = init_model(cfg)
    optimizer = build_optimizer(model, cfg)
    tokens = np.concatenate(shards)
    rng = np.random.default_rng([cfg.seed, 10_000])
    seq_len = cfg.decoder().seq_len
    initial = val_loss(model, val, seq_len, cfg.eval_windows)
    curve = []
    for _ in range(cfg.rounds):
        train_steps(model, optimizer, tokens, rng, cfg.local_steps, cfg.batch_size * cfg.clients, cfg)
        curve.append(val_loss(model, val, seq_len, cfg.eval_windows))
    return {
        "initial_val_loss": initial,
        "val_loss": curve[-1],
        "val_curve": curve,
        "tokens": cfg.rounds * cfg.local_steps * cfg.batch_size * cfg.clients * seq_len,
    }
