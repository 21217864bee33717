"""Pre-training throughput on encrypted vs plaintext token shards of the same data, in the same run.

Both shard artifacts are written to one temporary store from the same token stream: one plaintext
(read by memory map), one encrypted at rest (chunked AES-256-GCM, read range by range through the
codec, which decrypts only the chunks a window touches). One model is trained alternately on each:
blocks of `--steps` training steps (batch fetch + forward + backward + clip + AdamW), the order of
the two flipped every round so drift and background load hit both alike. Compilation and warmup
are not timed. Reported: tokens/s per source (from the median step) and the ratio encrypted / plain;
then the data loader alone (batches/s), with the default chunk cache and with none, the worst case
where every window decrypts the chunk(s) under it.

Data: top-level `.py` files of this Python's standard library, up to `--text-bytes` of text (about
400K tokens by default), a byte-level BPE of `--vocab-size` trained on it. Model: the quickstart's.

Usage:  python benchmarks/encryption_overhead.py [--steps 10] [--rounds 4] [--no-compile] [--text-bytes N]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lmloom.artifacts.store import Artifact, ArtifactStore
from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.security.context import LmloomSecurity
from lmloom.security.encryption import ChunkedAesGcmCodec
from lmloom.security.keyring import Keyring, LocalKek, generate_kek
from lmloom.tokenizers.bpe import train_bpe
from lmloom.tokenizers.loader import WindowLoader
from lmloom.tokenizers.shards import ShardWriter, TokenShards
from lmloom.train.optim import OptimConfig, build_optimizer

# The quickstart recipe's model and batch (src/lmloom/recipes/quickstart.yaml).
DEFAULTS = dict(vocab_size=8192, seq_len=256, d_model=256, n_layers=4, n_heads=4, batch_size=16)


def stdlib_texts(max_bytes: int) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts


def make_shards(store: ArtifactStore, texts: list[str], vocab_size: int) -> dict[str, Artifact]:
    tokenizer = train_bpe(texts, vocab_size=vocab_size)
    docs = tokenizer.encode_batch(texts)
    made = {}
    for label, encrypt in (("plain", False), ("encrypted", True)):
        out = store.create(kind="shards", stage="benchmark", config={}, encrypt=encrypt)
        with ShardWriter(out, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id) as writer:
            writer.add_batch("train", docs)
        made[label] = store.open(out.commit().id)
    return made


def with_cache(artifact: Artifact, store: ArtifactStore, cache_chunks: int) -> Artifact:
    """The same encrypted artifact, read with a chunk cache of another size."""
    codec = ChunkedAesGcmCodec.from_header(
        artifact.manifest.encryption, store.security.keys.dek, "benchmark", cache_chunks=cache_chunks
    )
    return Artifact(artifact.id, artifact.path, artifact.manifest, codec)


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--text-bytes", type=int, default=1_600_000, help="stdlib text to tokenize")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per source per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="eager model instead of torch.compile")
    parser.add_argument("--chunk-size", type=int, default=1 << 20, help="encryption chunk size in bytes")
    parser.add_argument("--loader-batches", type=int, default=300, help="batches in the loader-only timing")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    os.environ["LMLOOM_KEK"] = base64.b64encode(generate_kek()).decode()  # in memory only
    os.environ["LMLOOM_ENCRYPTION_CHUNK_SIZE"] = str(args.chunk_size)
    with tempfile.TemporaryDirectory(prefix="lmloom-enc-bench-") as root:
        Keyring.for_store(root).init(LocalKek(base64.b64decode(os.environ["LMLOOM_KEK"]), "benchmark"))
        store = ArtifactStore(root, security=LmloomSecurity(Path(root), "benchmark"))
        started = time.perf_counter()
        artifacts = make_shards(store, stdlib_texts(args.text_bytes), args.vocab_size)
        shards = {label: TokenShards(a, "train") for label, a in artifacts.items()}
        n_tokens = shards["plain"].n_tokens
        stored = artifacts["encrypted"].manifest.files["train-00000.bin"].size
        print(
            f"data: {n_tokens:,} tokens ({n_tokens * shards['plain'].dtype.itemsize / 2**20:.2f} MiB as "
            f"{shards['plain'].dtype.name}; encrypted file {stored / 2**20:.2f} MiB in "
            f"{args.chunk_size // 1024} KiB chunks), prepared in {time.perf_counter() - started:.1f}s"
        )
        loaders = {label: WindowLoader(s, args.seq_len, seed=0) for label, s in shards.items()}
        for a, b in zip(loaders["plain"].batch(0, 4), loaders["encrypted"].batch(0, 4), strict=True):
            assert torch.equal(a, b), "encrypted shards must give the same batches"

        train(args, loaders)
        loader_only(args, store, artifacts)


def train(args, loaders: dict[str, WindowLoader]) -> None:
    cfg = DecoderConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
    )
    torch.manual_seed(0)
    model = Decoder(cfg).train()
    optimizer = build_optimizer(model, OptimConfig(lr=3e-4))
    step_model = model if args.no_compile else torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = args.batch_size * args.seq_len
    sample = {label: 0 for label in loaders}

    def step(label: str) -> float:
        start = time.perf_counter()
        x, y = loaders[label].batch(sample[label], args.batch_size)
        sample[label] += args.batch_size
        with autocast(args.precision):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    t0 = time.perf_counter()
    for label in loaders:  # compile and warm up on both sources, untimed
        for _ in range(3):
            step(label)
    mode = "eager" if args.no_compile else "torch.compile"
    print(
        f"model: {model.num_params():,} parameters, {mode} + {args.precision}; warmup {time.perf_counter() - t0:.1f}s"
    )
    times: dict[str, list[float]] = {label: [] for label in loaders}
    order = list(loaders)
    for round_ in range(args.rounds):
        for label in order if round_ % 2 == 0 else order[::-1]:
            times[label] += [step(label) for _ in range(args.steps)]
    print(
        f"\ntraining ({args.rounds} rounds x {args.steps} steps per source, {tokens_per_step:,} tokens per step)"
    )
    rate = {}
    for label, values in times.items():
        rate[label] = tokens_per_step / statistics.median(values)
        mean_rate = tokens_per_step * len(values) / sum(values)
        print(
            f"  {label:<10} {rate[label]:>9,.0f} tokens/s (median step)   {mean_rate:>9,.0f} tokens/s (mean)   "
            f"steps {min(values) * 1e3:.0f}-{max(values) * 1e3:.0f} ms"
        )
    ratio = rate["encrypted"] / rate["plain"]
    change = f"{(1 - ratio) * 100:.1f}% slower" if ratio < 1 else f"{(ratio - 1) * 100:.1f}% faster (noise)"
    print(f"  encrypted / plain: {ratio:.3f} tokens/s, i.e. encrypted is {change}; target: at most 5% slower")


def loader_only(args, store: ArtifactStore, artifacts: dict[str, Artifact]) -> None:
    print(f"\ndata loader alone ({args.loader_batches} random batches of {args.batch_size} windows)")
    sources = {
        "plain (memory map)": artifacts["plain"],
        "encrypted, default cache": artifacts["encrypted"],
        "encrypted, no chunk cache": with_cache(artifacts["encrypted"], store, 0),
    }
    for label, artifact in sources.items():
        loader = WindowLoader(TokenShards(artifact, "train"), args.seq_len, seed=1)
        start = time.perf_counter()
        for i in range(args.loader_batches):
            loader.batch(i * args.batch_size, args.batch_size)
        seconds = time.perf_counter() - start
        per_batch = seconds / args.loader_batches
        print(
            f"  {label:<26} {per_batch * 1e3:7.3f} ms per batch   {args.loader_batches / seconds:9,.0f} batches/s"
        )


if __name__ == "__main__":
    sys.exit(main())
