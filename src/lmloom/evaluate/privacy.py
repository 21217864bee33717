"""Privacy audits of a trained language model: canary exposure, membership inference, extraction.

Everything works on token ids and any model that maps ids [B, T] to logits [B, T, V] (our `Decoder`
called without targets), so the same audit runs on a plain and on a DP-trained model.

- Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets ("my PIN is 4 8 1 5") inserted
  into the training data a set number of times each. Exposure = log2 |R| - log2 rank, the rank of the
  canary among all candidate secrets R by the model's log-perplexity; exactly by enumerating R, or by the
  paper's estimate from a sample of R (a skew-normal fitted to the sampled log-perplexities; scipy).
  Exposure near log2 |R| = memorised; a random secret's exposure is ~1 bit on average.
- Membership inference, each scored by ROC AUC and TPR at 1% and 0.1% FPR (Carlini et al. 2022): the
  loss attack (Yeom et al. 2018), Min-K% Prob (Shi et al. 2023) and an offline reference-model
  likelihood-ratio attack (LiRA-style: target loss calibrated by a reference model trained on other data).
- Extraction: greedy continuations of training-document prefixes; the fraction that reproduce the next
  k tokens verbatim, against the same for held-out documents.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] -> logits [B, T, V]
LOG2E = 1 / math.log(2)


# -- canaries and exposure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    prefix: tuple[int, ...]  # the fixed context, e.g. the ids of "my PIN is"
    secret: tuple[int, ...]  # the random part, drawn from alphabet ** len(secret)
    alphabet: tuple[int, ...]  # the ids a secret position can take (e.g. the digits)
    repetitions: int  # how many training windows carry it

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prefix + self.secret

    @property
    def space(self) -> int:
        """|R|, the number of candidate secrets."""
        return len(self.alphabet) ** len(self.secret)


def make_canaries(
    prefix: Sequence[int],
    alphabet: Sequence[int],
    secret_len: int,
    repetitions: Sequence[int] = (1, 4, 16),
    per_count: int = 1,
    seed: int = 0,
) -> list[Canary]:
    """`per_count` canaries for each repetition count, each with its own uniformly random secret."""
    rng = np.random.default_rng(seed)
    canaries, seen = [], set()
    for reps in repetitions:
        for _ in range(per_count):
            while True:
                secret = tuple(int(a) for a in rng.choice(np.asarray(alphabet), secret_len))
                if secret not in seen:
                    break
            seen.add(secret)
            canaries.append(Canary(tuple(prefix), secret, tuple(alphabet), int(reps)))
    return canaries


def insert_canaries(
    windows: np.ndarray, canaries: Sequence[Canary], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Copy of training windows [N, L] with each canary written at a random offset of `repetitions`
    distinct windows (no window gets two); also returns which windows carry a canary (bool [N])."""
    out = np.array(windows, copy=True)
    n, length = out.shape
    need = sum(c.repetitions for c in canaries)
    if need > n:
        raise ValueError(f"{need} canary insertions do not fit in {n} windows")
    rng = np.random.default_rng(seed)
    hosts = iter(rng.permutation(n)[:need])
    carries = np.zeros(n, dtype=bool)
    for canary in canaries:
        tokens = np.asarray(canary.tokens)
        if len(tokens) > length:
            raise ValueError(f"a canary of {len(tokens)} tokens does not fit a window of {length}")
        for _ in range(canary.repetitions):
            row = next(hosts)
            start = int(rng.integers(0, length - len(tokens) + 1))
            out[row, start : start + len(tokens)] = tokens
            carries[row] = True
    return out, carries


@torch.no_grad()
def secret_log_perplexity(
    model: Model, prefix: Sequence[int], secrets: np.ndarray, batch_size: int = 1024
) -> np.ndarray:
    """-log2 P(secret | prefix) under the model for each candidate secret [M, k] (bits; lower = likelier).

    The prefix is shared by every candidate, so this ranks candidates as the full sequence's
    log-perplexity does."""
    secrets = np.asarray(secrets, dtype=np.int64)
    p = len(prefix)
    out = np.empty(len(secrets))
    for s in range(0, len(secrets), batch_size):
        chunk = torch.from_numpy(secrets[s : s + batch_size])
        seq = torch.cat([torch.tensor(prefix, dtype=torch.int64).expand(len(chunk), p), chunk], dim=1)
        logp = F.log_softmax(model(seq[:, :-1]).float(), dim=-1)
        targets = seq[:, p:]
        picked = logp[:, p - 1 :].gather(-1, targets[..., None]).squeeze(-1)
        out[s : s + len(chunk)] = -picked.sum(1).numpy() * LOG2E
    return out


@dataclass
class ExposureResult:
    repetitions: int
    exposure: float  # bits
    max_exposure: float  # log2 |R|
    rank: float | None  # 1 = the likeliest candidate (exact method)
    log_perplexity: float  # of the canary's secret, bits
    method: str


def exposure(
    model: Model,
    canary: Canary,
    method: str = "exact",
    samples: int = 4096,
    seed: int = 0,
    batch_size: int = 1024,
) -> ExposureResult:
    """Exposure of one canary. `exact`: rank among all |R| candidates (rank = 1 + the number strictly
    likelier). `sampled`: Carlini et al.'s estimate from `samples` random candidates, exposure =
    -log2 P(candidate log-perplexity <= the canary's), the probability from a skew-normal fitted to the
    sample (scipy), or from the sample's empirical CDF without scipy."""
    canary_ppl = float(secret_log_perplexity(model, canary.prefix, np.array([canary.secret]))[0])
    max_exposure = math.log2(canary.space)
    alphabet = np.asarray(canary.alphabet)
    if method == "exact":
        if canary.space > 2_000_000:
            raise ValueError(f"|R| = {canary.space:,} is too many to enumerate: use method='sampled'")
        candidates = np.array(list(itertools.product(alphabet, repeat=len(canary.secret))))
        ppl = secret_log_perplexity(model, canary.prefix, candidates, batch_size)
        rank = 1 + int((ppl < canary_ppl).sum())
        return ExposureResult(
            canary.repetitions, max_exposure - math.log2(rank), max_exposure, rank, canary_ppl, "exact"
        )
    if method != "sampled":
        raise ValueError(f"method {method!r}: choose exact or sampled")
    rng = np.random.default_rng(seed)
    candidates = rng.choice(alphabet, (samples, len(canary.secret)))
    ppl = secret_log_perplexity(model, canary.prefix, candidates, batch_size)
    try:
        from scipy import stats

        a, loc, scale = stats.skewnorm.fit(ppl)
        cdf = float(stats.skewnorm.cdf(canary_ppl, a, loc, scale))
    except ImportError:  # the empirical CDF, bounded by the sample's resolution
        cdf = (1 + (ppl <= canary_ppl).sum()) / (samples + 1)
    cdf = max(cdf, 1.0 / canary.space)  # no estimate beyond log2 |R|
    return ExposureResult(canary.repetitions, -math.log2(cdf), max_exposure, None, canary_ppl, "sampled")


# -- membership inference --------------------------------------------------------------------------


@torch.no_grad()
def token_log_probs(model: Model, windows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """log P(token t+1 | tokens ..t) for each window [N, L] -> [N, L - 1] (nats)."""
    windows = torch.as_tensor(np.asarray(windows), dtype=torch.int64)
    out = []
    for s in range(0, len(windows), batch_size):
        chunk = windows[s : s + batch_size]
        logp = F.log_softmax(model(chunk[:, :-1]).float(), dim=-1)
        out.append(logp.gather(-1, chunk[:, 1:, None]).squeeze(-1).numpy())
    return np.concatenate(out)


def loss_scores(logp: np.ndarray) -> np.ndarray:
    """Loss attack: higher score = lower mean loss = more likely a member."""
    return logp.mean(1)


def min_k_scores(logp: np.ndarray, k: float = 0.2) -> np.ndarray:
    """Min-K% Prob: the mean log-probability of the k fraction of least likely tokens."""
    n = max(1, int(math.ceil(k * logp.shape[1])))
    return np.sort(logp, axis=1)[:, :n].mean(1)


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every threshold, members positive, higher score = member (sklearn when installed)."""
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    try:
        from sklearn.metrics import roc_curve as sk_roc

        fpr, tpr, _ = sk_roc(y, s, drop_intermediate=False)
        return fpr, tpr
    except ImportError:
        order = np.argsort(-s, kind="mergesort")
        s, y = s[order], y[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of tied scores
        tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
        return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR among thresholds with FPR <= target (0 when none)."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    members: int
    nonmembers: int


def score_attack(name: str, member_scores: np.ndarray, nonmember_scores: np.ndarray) -> AttackResult:
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return AttackResult(
        name,
        roc_auc(fpr, tpr),
        tpr_at_fpr(fpr, tpr, 0.01),
        tpr_at_fpr(fpr, tpr, 0.001),
        len(member_scores),
        len(nonmember_scores),
    )


def membership_inference(
    target: Model,
    members: np.ndarray,
    nonmembers: np.ndarray,
    reference: Model | None = None,
    k: float = 0.2,
) -> list[AttackResult]:
    """Loss, Min-K% Prob and (with a reference model trained on other data from the same distribution)
    the reference-calibrated likelihood-ratio attack on windows [N, L] of members and non-members.
    TPR at an FPR below 1 / len(nonmembers) can only be measured as the zero-false-positive TPR."""
    lp_in, lp_out = token_log_probs(target, members), token_log_probs(target, nonmembers)
    results = [
        score_attack("loss", loss_scores(lp_in), loss_scores(lp_out)),
        score_attack(f"min-{round(k * 100)}% prob", min_k_scores(lp_in, k), min_k_scores(lp_out, k)),
    ]
    if reference is not None:
        ref_in, ref_out = token_log_probs(reference, members), token_log_probs(reference, nonmembers)
        results.append(
            score_attack(
                "reference LR (offline LiRA)",
                loss_scores(lp_in) - loss_scores(ref_in),
                loss_scores(lp_out) - loss_scores(ref_out),
            )
        )
    return results


# -- extraction ---------------------------------------------------------------------------------


@torch.no_grad()
def greedy_continue(model: Model, prefixes: np.ndarray, n_tokens: int, batch_size: int = 256) -> np.ndarray:
    """Greedy continuations [N, n_tokens] of prefixes [N, P] (full forward per token: short audits)."""
    prefixes = torch.as_tensor(np.asarray(prefixes), dtype=torch.int64)
    out = []
    for s in range(0, len(prefixes), batch_size):
        seq = prefixes[s : s + batch_size]
        for _ in range(n_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq[:, -n_tokens:].numpy())
    return np.concatenate(out)


@dataclass
class ExtractionResult:
    prefix_len: int
    k: int
    train_rate: float  # fraction of training documents whose next k tokens come back verbatim
    heldout_rate: float  # the same for documents the model never saw
    train_docs: int
    heldout_docs: int


def extraction_rate(
    model: Model, train_docs: np.ndarray, heldout_docs: np.ndarray, prefix_len: int, k: int
) -> ExtractionResult:
    """Prompt with the first `prefix_len` tokens of each document [N, >= prefix_len + k] and check whether
    greedy decoding reproduces the next `k` tokens exactly (Carlini et al. 2021's k-extractability)."""

    def rate(docs: np.ndarray) -> float:
        docs = np.asarray(docs)
        got = greedy_continue(model, docs[:, :prefix_len], k)
        return float((got == docs[:, prefix_len : prefix_len + k]).all(1).mean())

    return ExtractionResult(
        prefix_len, k, rate(train_docs), rate(heldout_docs), len(train_docs), len(heldout_docs)
    )


# -- the report ----------------------------------------------------------------------------------


@dataclass
class PrivacyReport:
    exposures: list[ExposureResult] = field(default_factory=list)
    attacks: list[AttackResult] = field(default_factory=list)
    extraction: ExtractionResult | None = None
    epsilon: float | None = None  # of the audited model, when trained with DP
    delta: float | None = None
    label: str = ""

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "exposures": [asdict(e) for e in self.exposures],
            "membership_inference": [asdict(a) for a in self.attacks],
            "extraction": asdict(self.extraction) if self.extraction else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def exposure_at(self, repetitions: int) -> float:
        """Mean exposure of the canaries inserted `repetitions` times."""
        return float(np.mean([e.exposure for e in self.exposures if e.repetitions == repetitions]))

    def attack(self, name: str) -> AttackResult:
        return next(a for a in self.attacks if a.attack.startswith(name))


def audit(
    model: Model,
    canaries: Sequence[Canary] = (),
    members: np.ndarray | None = None,
    nonmembers: np.ndarray | None = None,
    reference: Model | None = None,
    extraction: tuple[int, int] | None = None,  # (prefix_len, k): run on members vs non-members
    exposure_method: str = "exact",
    label: str = "",
) -> PrivacyReport:
    """All three audits of one model; `model` is put in eval mode."""
    for m in (model, reference):
        if isinstance(m, torch.nn.Module):
            m.eval()
    report = PrivacyReport(label=label)
    report.exposures = [exposure(model, c, exposure_method) for c in canaries]
    if members is not None and nonmembers is not None:
        report.attacks = membership_inference(model, members, nonmembers, reference)
        if extraction is not None:
            report.extraction = extraction_rate(model, members, nonmembers, *extraction)
    return report


def summary_table(reports: Sequence[PrivacyReport]) -> str:
    """A plain-text table with one column per report (e.g. without and with DP)."""
    rows: list[tuple[str, list[str]]] = [
        ("epsilon", [f"{r.epsilon:.2f}" if r.epsilon is not None else "inf (no DP)" for r in reports])
    ]
    reps = sorted({e.repetitions for r in reports for e in r.exposures})
    for n in reps:
        cells = []
        for r in reports:
            found = [e for e in r.exposures if e.repetitions == n]
            cells.append(
                f"{np.mean([e.exposure for e in found]):.2f} / {found[0].max_exposure:.2f}" if found else "-"
            )
        rows.append((f"exposure, canary x{n} (bits)", cells))
    names = [a.attack for a in reports[0].attacks] if reports else []
    for name in names:
        cells = []
        for r in reports:
            a = next((a for a in r.attacks if a.attack == name), None)
            cells.append(
                f"AUC {a.auc:.3f}  TPR@1% {a.tpr_at_1pct_fpr:.3f}  TPR@0.1% {a.tpr_at_0_1pct_fpr:.3f}"
                if a
                else "-"
            )
        rows.append((f"MIA {name}", cells))
    if any(r.extraction for r in reports):
        e0 = next(r.extraction for r in reports if r.extraction)
        rows.append(
            (
                f"extraction ({e0.k}-token exact, train / held-out)",
                [
                    f"{r.extraction.train_rate:.3f} / {r.extraction.heldout_rate:.3f}"
                    if r.extraction
                    else "-"
                    for r in reports
                ],
            )
        )
    header = ["", *[r.label or f"model {i}" for i, r in enumerate(reports)]]
    table = [header, *[[name, *cells] for name, cells in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
