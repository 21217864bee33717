"""The pre-training objectives: exact layouts on small cases, and their statistics over many samples."""

from __future__ import annotations

import math

import pytest
import torch

from lmloom.errors import ConfigError, DataError
from lmloom.objectives import (
    IGNORE_INDEX,
    MaskedLMConfig,
    SpanCorruptionConfig,
    causal_lm,
    masked_lm,
    prefix_lm,
    prefix_lm_attention_mask,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
    tokens_length_for_inputs,
)
from lmloom.objectives.span import noise_counts
from lmloom.tokenizers.base import BOS_ID, EOS_ID, PAD_ID

VOCAB = 1000
MASK_ID = 999
FIRST_SENTINEL = 998  # sentinels count down from here; ordinary tokens stay below 800
SPECIALS = frozenset({BOS_ID, EOS_ID, PAD_ID, 3})  # 3: an unk id


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ordinary_windows(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 800, (batch, length), generator=seeded(seed))


def windows_with_specials(batch: int, length: int, seed: int) -> torch.Tensor:
    """Ordinary tokens with about a quarter of positions replaced by special ids, and a padded tail."""
    g = seeded(seed)
    windows = torch.randint(4, 800, (batch, length), generator=g)
    specials = torch.tensor(sorted(SPECIALS))
    sprinkle = torch.rand(batch, length, generator=g) < 0.25
    windows = torch.where(
        sprinkle, specials[torch.randint(len(specials), (batch, length), generator=g)], windows
    )
    windows[0, length // 2 :] = PAD_ID
    return windows


# --- causal ---------------------------------------------------------------------------------------------


def test_causal_lm_shifts_inputs_and_targets_by_one_token():
    windows = torch.arange(12).view(2, 6)
    batch = causal_lm(windows)
    assert torch.equal(batch.input_ids, torch.tensor([[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]))
    assert torch.equal(batch.targets, torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]))
    assert batch.attention_mask is None and batch.decoder_input_ids is None


def test_causal_lm_refuses_windows_too_short_to_shift():
    with pytest.raises(DataError):
        causal_lm(torch.zeros(2, 1, dtype=torch.long))


# --- masked LM ------------------------------------------------------------------------------------------

MLM = MaskedLMConfig(mask_token_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)


def test_masked_lm_rates_over_many_samples():
    g = seeded(1)
    chosen_total = eligible_total = masked = randomised = unchanged = 0
    for seed in range(8):
        windows = windows_with_specials(32, 256, seed)
        batch = masked_lm(windows, MLM, g)
        chosen = batch.targets != IGNORE_INDEX
        eligible = ~torch.isin(windows, torch.tensor(sorted(SPECIALS)))
        chosen_total += int(chosen.sum())
        eligible_total += int(eligible.sum())
        got = batch.input_ids[chosen]
        masked += int((got == MASK_ID).sum())
        unchanged += int((got == windows[chosen]).sum())
        randomised += int(((got != MASK_ID) & (got != windows[chosen])).sum())

    assert chosen_total / eligible_total == pytest.approx(0.15, abs=0.002)
    # ~7,300 chosen positions: one standard deviation of a 10% share is ~0.35%.
    assert masked / chosen_total == pytest.approx(0.8, abs=0.02)
    assert randomised / chosen_total == pytest.approx(0.1, abs=0.015)
    assert unchanged / chosen_total == pytest.approx(0.1, abs=0.015)


def test_masked_lm_never_chooses_specials_and_targets_only_chosen_positions():
    windows = windows_with_specials(16, 128, seed=3)
    batch = masked_lm(windows, MLM, seeded(4))
    chosen = batch.targets != IGNORE_INDEX
    special = torch.isin(windows, torch.tensor(sorted(SPECIALS)))
    assert chosen.any()
    assert not (chosen & special).any()
    assert torch.equal(batch.targets[chosen], windows[chosen])
    # Outside the chosen positions the input is the window itself, specials included.
    assert torch.equal(batch.input_ids[~chosen], windows[~chosen])
    # Each row carries exactly round(15% of its eligible tokens).
    eligible = (~special).sum(dim=1).double()
    assert torch.equal(chosen.sum(dim=1), torch.round(eligible * 0.15).long())


def test_masked_lm_random_replacements_are_ordinary_tokens():
    windows = ordinary_windows(32, 256, seed=5)
    batch = masked_lm(windows, MLM, seeded(6))
    chosen = batch.targets != IGNORE_INDEX
    replaced = chosen & (batch.input_ids != MASK_ID) & (batch.input_ids != windows)
    drawn = batch.input_ids[replaced]
    assert len(drawn) > 50
    assert not torch.isin(drawn, torch.tensor(sorted(SPECIALS | {MASK_ID}))).any()
    assert bool(((drawn >= 0) & (drawn < VOCAB)).all())


def test_masked_lm_attention_is_bidirectional_except_padding_keys():
    windows = torch.tensor([[5, 6, 7, PAD_ID], [5, BOS_ID, 7, 8]])
    mask = masked_lm(windows, MLM, seeded(0)).attention_mask
    expected_row0 = torch.tensor(
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool
    )  # the padding query keeps itself, so softmax never sees an empty row
    assert torch.equal(mask[0], expected_row0)
    assert bool(mask[1].all())


def test_masked_lm_config_refuses_impossible_rates():
    with pytest.raises(ConfigError):
        MaskedLMConfig(
            mask_token_id=MASK_ID, vocab_size=VOCAB, replace_with_mask=0.95, replace_with_random=0.1
        )
    with pytest.raises(ConfigError):
        MaskedLMConfig(mask_token_id=VOCAB, vocab_size=VOCAB)


# --- span corruption ------------------------------------------------------------------------------------

SPAN = SpanCorruptionConfig(first_sentinel_id=FIRST_SENTINEL)


def spans_of(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool mask."""
    lengths, run = [], 0
    for is_noise in mask.tolist():
        if is_noise:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths + ([run] if run else [])


def reconstruct(encoder: list[int], decoder: list[int]) -> list[int]:
    """The original row from an encoder input and its decoder targets, both ending in eos."""
    assert encoder[-1] == EOS_ID and decoder[-1] == EOS_ID
    spans: dict[int, list[int]] = {}
    current = None
    for token in decoder[:-1]:
        if token > FIRST_SENTINEL - SPAN.n_sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out: list[int] = []
    for token in encoder[:-1]:
        out.extend(spans.pop(token) if token in spans else [token])
    assert not spans, "every decoder span has its sentinel in the encoder input"
    return out


def test_noise_mask_density_and_mean_span_length_across_lengths():
    g = seeded(7)
    for length in (64, 100, 257, 512, 1024, 2048):
        noise_tokens = spans = 0
        for _ in range(20):
            mask = random_spans_noise_mask(length, 0.15, 3.0, g)
            noise_tokens += int(mask.sum())
            spans += len(spans_of(mask))
        # The counts are rounded, as in T5: density is off by at most half a token per row.
        assert noise_tokens / (20 * length) == pytest.approx(0.15, abs=0.5 / length + 1e-9)
        # Rounding the span count moves short rows' mean further (64 tokens: 10 noise in 3 spans).
        n_noise, n_spans = noise_counts(length, 0.15, 3.0)
        assert noise_tokens / spans == pytest.approx(n_noise / n_spans)
        if length >= 256:
            assert noise_tokens / spans == pytest.approx(3.0, abs=0.1)


def test_noise_mask_starts_kept_ends_noise_and_draws_every_segmentation_alike():
    g = seeded(8)
    n_noise, n_spans = noise_counts(100, 0.15, 3.0)
    assert (n_noise, n_spans) == (15, 5)
    first_span_is_one = 0
    samples = 3000
    for _ in range(samples):
        mask = random_spans_noise_mask(100, 0.15, 3.0, g)
        assert not mask[0] and mask[-1]
        lengths = spans_of(mask)
        assert len(lengths) == n_spans and sum(lengths) == n_noise
        first_span_is_one += lengths[0] == 1
    # Uniform over compositions of 15 into 5 positive parts: P(first part = 1) = C(13, 3) / C(14, 4).
    expected = math.comb(13, 3) / math.comb(14, 4)
    assert first_span_is_one / samples == pytest.approx(expected, abs=0.03)


def test_span_corruption_sentinel_layout_and_exact_reconstruction():
    windows = ordinary_windows(8, 200, seed=9)
    batch = span_corruption(windows, SPAN, seeded(10))
    for row in range(len(windows)):
        encoder = batch.input_ids[row].tolist()
        decoder = [t for t in batch.targets[row].tolist() if t != IGNORE_INDEX]
        encoder = encoder[: encoder.index(EOS_ID) + 1]
        enc_sentinels = [t for t in encoder if t > 800]
        dec_sentinels = [t for t in decoder if t > 800]
        n_spans = noise_counts(200, 0.15, 3.0)[1]
        assert enc_sentinels == [FIRST_SENTINEL - k for k in range(n_spans)]
        assert dec_sentinels == enc_sentinels
        assert decoder[0] == FIRST_SENTINEL  # the targets open with sentinel 0
        assert encoder[-2] == FIRST_SENTINEL - (n_spans - 1)  # the last token is always noise
        assert reconstruct(encoder, decoder) == windows[row].tolist()


def test_span_corruption_pads_rows_of_different_lengths():
    windows = ordinary_windows(3, 120, seed=11)
    windows[1, 60:] = PAD_ID
    windows[2, 90:] = PAD_ID
    batch = span_corruption(windows, SPAN, seeded(12))
    assert batch.input_ids.shape[1] == span_corruption_lengths(120, SPAN)[0]
    assert batch.targets.shape[1] == span_corruption_lengths(120, SPAN)[1]
    for row, n_tokens in enumerate((120, 60, 90)):
        enc_len, dec_len = span_corruption_lengths(n_tokens, SPAN)
        encoder, targets = batch.input_ids[row], batch.targets[row]
        assert encoder[enc_len - 1] == EOS_ID and bool((encoder[enc_len:] == PAD_ID).all())
        assert targets[dec_len - 1] == EOS_ID and bool((targets[dec_len:] == IGNORE_INDEX).all())
        assert EOS_ID not in encoder[: enc_len - 1].tolist()
        visible = batch.attention_mask[row][0]  # what a real query sees
        assert visible.tolist() == [j < enc_len for j in range(len(encoder))]
        decoded = reconstruct(encoder[:enc_len].tolist(), targets[:dec_len].tolist())
        assert decoded == windows[row, :n_tokens].tolist()


def test_span_corruption_decoder_inputs_are_targets_shifted_right():
    windows = ordinary_windows(2, 50, seed=13)
    windows[1, 30:] = PAD_ID
    batch = span_corruption(windows, SPAN, seeded(14))
    assert bool((batch.decoder_input_ids[:, 0] == SPAN.decoder_start_id).all())
    shifted = batch.targets[:, :-1]
    real = shifted != IGNORE_INDEX
    assert torch.equal(batch.decoder_input_ids[:, 1:][real], shifted[real])
    assert bool((batch.decoder_input_ids[:, 1:][~real] == PAD_ID).all())


def test_tokens_length_for_inputs_matches_t5_and_fills_the_encoder():
    # T5's span-corruption setup: 568-token windows give 512 encoder and 114 decoder tokens.
    assert tokens_length_for_inputs(512, SPAN) == 568
    assert span_corruption_lengths(568, SPAN) == (512, 114)
    assert span_corruption_lengths(569, SPAN)[0] > 512


def test_span_corruption_refuses_rows_needing_more_sentinels_than_configured():
    few = SpanCorruptionConfig(first_sentinel_id=FIRST_SENTINEL, n_sentinels=4)
    with pytest.raises(DataError):
        span_corruption(ordinary_windows(1, 200, seed=0), few, seeded(0))


# --- prefix LM ------------------------------------------------------------------------------------------


def test_prefix_lm_mask_equals_hand_built_reference():
    expected = torch.tensor(
        [
            # prefix length 2 of 5 positions
            [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
            # prefix length 4
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(prefix_lm_attention_mask(torch.tensor([2, 4]), 5), expected)
    batch = prefix_lm(torch.arange(12).view(2, 6), prefix_lengths=torch.tensor([2, 4]))
    assert torch.equal(batch.attention_mask, expected)
    # Loss only on continuation tokens (window index >= prefix length).
    assert batch.targets.tolist() == [[-100, 2, 3, 4, 5], [-100, -100, -100, 10, 11]]
    assert torch.equal(batch.input_ids, torch.arange(12).view(2, 6)[:, :-1])


def test_prefix_lm_loss_positions_never_see_their_target():
    windows = ordinary_windows(64, 33, seed=15)
    batch = prefix_lm(windows, seeded(16), min_prefix=4, max_prefix=20)
    prefix = batch.attention_mask[:, 0, :].sum(dim=1)  # query 0 sees exactly the prefix
    assert bool(((prefix >= 4) & (prefix <= 20)).all()) and len(prefix.unique()) > 5
    positions = torch.arange(32)
    has_loss = batch.targets != IGNORE_INDEX
    assert torch.equal(has_loss, positions[None, :] + 1 >= prefix[:, None])
    # A loss position i predicts token i + 1; no query with a loss can see key i + 1 or later.
    future = positions[None, :] > positions[:, None]  # [query, key]
    assert not (batch.attention_mask & future[None] & has_loss[:, :, None]).any()


# --- determinism ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective",
    [
        lambda w, g: masked_lm(w, MLM, g),
        lambda w, g: span_corruption(w, SPAN, g),
        lambda w, g: prefix_lm(w, g),
    ],
    ids=["masked", "span", "prefix"],
)
def test_same_seed_gives_identical_batches_and_ignores_global_seed(objective):
    windows = ordinary_windows(4, 64, seed=17)
    torch.manual_seed(1)
    first = objective(windows, seeded(18))
    torch.manual_seed(2)  # the global generator must not matter
    second = objective(windows, seeded(18))
    other = objective(windows, seeded(19))
    for name in ("input_ids", "targets", "attention_mask", "decoder_input_ids"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert not (torch.equal(first.targets, other.targets) and torch.equal(first.input_ids, other.input_ids))
