"""Robustness: how much a model's figures drop when its input is perturbed in ways that keep the meaning.

On held-out text (the validation split of the corpus the checkpoint was trained on, found through its
lineage, else the built-in `probes/heldout.txt`) it measures the validation loss and the next-token
accuracy, clean and under each perturbation; for a chat model (tuned or aligned) also the refusal rate on
the safety set's held-out harmful prompts, clean and perturbed. Perturbations, all seeded:

- `typos`: swap two adjacent letters in ~10% of the words;
- `casing`: upper-case everything;
- `whitespace`: doubled spaces, tabs and trailing spaces;
- `paraphrase`: a lead-in template and rule-based rewrites (contractions, synonyms) that keep the meaning;
- `adversarial_suffix`: a suffix from the built-in list (`probes/adversarial_suffixes.json`) appended.

Drops: `loss_increase` = perturbed - clean loss (nats), `accuracy_drop` = clean - perturbed accuracy,
`refusal_drop` = clean - perturbed refusal rate. `max_drop` is the largest accuracy drop.

Limits: the text perturbations change the tokens too, so part of the loss increase is the perturbed text
being less predictable, not the model being brittle; the refusal rate uses the phrase detector of
`lmloom.tune.safety` on short greedy replies.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch

PERTURBATIONS = ("typos", "casing", "whitespace", "paraphrase", "adversarial_suffix")
_REWRITES = [
    (r"\bdo not\b", "don't"),
    (r"\bdoes not\b", "doesn't"),
    (r"\bis not\b", "isn't"),
    (r"\bcannot\b", "can not"),
    (r"\bit is\b", "it's"),
    (r"\buses\b", "makes use of"),
    (r"\bbecause\b", "since"),
    (r"\bfor example\b", "for instance"),
    (r"\bbig\b", "large"),
    (r"\bfast\b", "quick"),
    (r"\breturns\b", "gives back"),
    (r"\bshould\b", "ought to"),
]
_LEAD_INS = ["In other words, ", "To put it another way: ", "Here is the text again. ", "Said differently, "]


def load_suffixes() -> list[str]:
    path = resources.files("lmloom.evaluate").joinpath("probes", "adversarial_suffixes.json")
    return json.loads(path.read_text("utf-8"))["suffixes"]


def builtin_heldout() -> list[str]:
    text = resources.files("lmloom.evaluate").joinpath("probes", "heldout.txt").read_text("utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def typos(text: str, rng: random.Random, rate: float = 0.1) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        if len(word) < 2 or rng.random() >= rate:
            return word
        i = rng.randrange(len(word) - 1)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]

    return re.sub(r"[A-Za-z]+", swap, text)


def casing(text: str, rng: random.Random) -> str:
    return text.upper()


def whitespace(text: str, rng: random.Random) -> str:
    spaced = re.sub(" ", lambda _: rng.choice([" ", "  ", "\t", " "]), text)
    return "\n".join(line + " " * rng.randrange(3) for line in spaced.split("\n"))


def paraphrase(text: str, rng: random.Random) -> str:
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement, text)
    return rng.choice(_LEAD_INS) + text


def make_perturbations(seed: int = 0) -> dict[str, Callable[[str, int], str]]:
    """name -> f(text, index): deterministic for (seed, name, index)."""
    suffixes = load_suffixes()
    plain = {"typos": typos, "casing": casing, "whitespace": whitespace, "paraphrase": paraphrase}
    out: dict[str, Callable[[str, int], str]] = {
        name: (lambda text, i, fn=fn, name=name: fn(text, random.Random(f"{seed}:{name}:{i}")))
        for name, fn in plain.items()
    }
    out["adversarial_suffix"] = lambda text, i: text + suffixes[i % len(suffixes)]
    return out


@torch.no_grad()
def text_figures(model, tokenizer, documents: list[str], seq_len: int, max_windows: int) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over windows of the documents' tokens (EOS between)."""
    model.eval()
    ids: list[int] = []
    for doc in documents:
        ids += [*tokenizer.encode(doc), tokenizer.eos_id]
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        seq_len, n = len(ids) - 1, 1
    rows = torch.tensor([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    logits = model(rows[:, :-1]).float()
    targets = rows[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return {"loss": float(loss), "accuracy": float(accuracy), "tokens": int(targets.numel())}


def refusal_rate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> float:
    from lmloom.tune.safety import refusal_detector
    from lmloom.tune.stage import chat_replies

    replies = chat_replies(model, tokenizer, prompts, max_new_tokens)
    return sum(refusal_detector(text) for text, _ in replies) / max(len(replies), 1)


def robustness_report(
    model,
    tokenizer,
    documents: list[str],
    *,
    chat: bool = False,
    seed: int = 0,
    seq_len: int = 128,
    max_windows: int = 32,
    max_new_tokens: int = 24,
    source: str = "built-in",
) -> dict[str, Any]:
    was_training = model.training
    seq_len = min(seq_len, model.config.seq_len)
    perturb = make_perturbations(seed)
    clean = text_figures(model, tokenizer, documents, seq_len, max_windows)
    perturbed = {}
    for name, fn in perturb.items():
        figures = text_figures(
            model, tokenizer, [fn(d, i) for i, d in enumerate(documents)], seq_len, max_windows
        )
        figures["loss_increase"] = figures["loss"] - clean["loss"]
        figures["accuracy_drop"] = clean["accuracy"] - figures["accuracy"]
        perturbed[name] = figures
    report: dict[str, Any] = {
        "source": source,
        "documents": len(documents),
        "seed": seed,
        "seq_len": seq_len,
        "clean": clean,
        "perturbations": perturbed,
        "max_loss_increase": max(p["loss_increase"] for p in perturbed.values()),
        "max_accuracy_drop": max(p["accuracy_drop"] for p in perturbed.values()),
        "refusal": None,
    }
    report["max_drop"] = report["max_accuracy_drop"]
    if chat:
        from lmloom.tune.safety import load_safety_set

        prompts = [item.prompt for item in load_safety_set("held_out") if item.kind == "harmful"]
        base = refusal_rate(model, tokenizer, prompts, max_new_tokens)
        rates = {
            name: refusal_rate(model, tokenizer, [fn(p, i) for i, p in enumerate(prompts)], max_new_tokens)
            for name, fn in perturb.items()
        }
        report["refusal"] = {
            "clean": base,
            "perturbed": rates,
            "max_drop": max(base - r for r in rates.values()),
            "min_rate": min([base, *rates.values()]),
        }
    model.train(was_training)
    return report


def robustness_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    refusal = report.get("refusal")
    rows = [
        (
            "clean",
            f"{report['clean']['loss']:.4f}",
            "",
            f"{report['clean']['accuracy']:.3f}",
            "",
            f"{refusal['clean']:.0%}" if refusal else "-",
        )
    ]
    for name, p in report["perturbations"].items():
        rows.append(
            (
                name,
                f"{p['loss']:.4f}",
                f"{p['loss_increase']:+.4f}",
                f"{p['accuracy']:.3f}",
                f"{p['accuracy_drop']:+.3f}",
                f"{refusal['perturbed'][name]:.0%}" if refusal else "-",
            )
        )
    return rows


ROBUSTNESS_COLUMNS = ("input", "loss", "loss increase", "next-token acc", "acc drop", "refusal rate")
