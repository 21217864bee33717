"""The privacy audit's acceptance test: a tiny model that memorises its training data and inserted canaries
without DP (high exposure, high membership-inference AUC, verbatim extraction) and does not with DP-SGD.

Data: random windows of 25 tokens over 35 "word" ids (nothing to learn but the windows themselves), with
three canaries "<p> <p> <p> d d d d" (|R| = 10^4 secrets of 4 digits) inserted 1, 4 and 16 times.
Members: the training windows without a canary; non-members: 1024 fresh windows; the reference model of the
likelihood-ratio attack: the same recipe on other windows.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant  # noqa: E402

from lmloom.evaluate.privacy import audit, insert_canaries, make_canaries, summary_table  # noqa: E402
from lmloom.models.decoder import Decoder, DecoderConfig  # noqa: E402
from lmloom.privacy.dp import DPConfig, train_private  # noqa: E402

V, T, N, STEPS, BATCH, LR = 48, 24, 128, 200, 16, 3e-3
DIGITS, PREFIX = list(range(10)), [45, 46, 47]
CFG = DecoderConfig.preset("tiny", vocab_size=V, seq_len=T, d_model=64, n_heads=4)
EPSILON = 2.0


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared, loaded machine one thread ran these tiny steps ~10x faster than two (oversubscription).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_windows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 45, (n, T + 1))


def train_plain(windows: np.ndarray, seed: int) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data, rng = torch.as_tensor(windows), np.random.default_rng(seed)
    for _ in range(STEPS):
        x = data[rng.choice(len(data), BATCH, replace=False)]
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_dp_sgd_removes_the_memorisation_a_plain_run_shows():
    started = time.perf_counter()
    canaries = make_canaries(PREFIX, DIGITS, 4, (1, 4, 16), seed=5)
    train, carries = insert_canaries(random_windows(N, 1), canaries, seed=6)
    members, nonmembers = train[~carries], random_windows(1024, 2)

    plain = train_plain(train, seed=0)
    reference = train_plain(random_windows(N, 3), seed=1)
    torch.manual_seed(0)
    private_model = Decoder(CFG)
    dp = DPConfig(target_epsilon=EPSILON, max_grad_norm=1.0, accountant="rdp")
    private = train_private(private_model, train, dp, steps=STEPS, batch_size=BATCH, lr=LR)

    no_dp = audit(plain, canaries, members, nonmembers, reference, extraction=(8, 8), label="no DP")
    with_dp = audit(
        private_model, canaries, members, nonmembers, reference, extraction=(8, 8), label="DP-SGD"
    )
    with_dp.epsilon, with_dp.delta = private.spent(), private.delta
    print()
    print(summary_table([no_dp, with_dp]))
    print(
        f"noise multiplier {private.noise_multiplier:.4f}, q {private.sample_rate}, {STEPS} steps; "
        f"{time.perf_counter() - started:.1f} s"
    )

    # Our epsilon is Opacus' own accountant's, computed independently from the same noise, rate and steps.
    independent = RDPAccountant()
    for _ in range(STEPS):
        independent.step(noise_multiplier=private.noise_multiplier, sample_rate=private.sample_rate)
    assert with_dp.epsilon == pytest.approx(independent.get_epsilon(delta=1 / N), rel=1e-12)
    assert with_dp.epsilon <= EPSILON and private.delta == 1 / N

    # Without DP: the 16x canary is the likeliest of all 10^4 secrets, membership is plain to see.
    assert no_dp.exposure_at(16) >= 12.0
    assert no_dp.exposure_at(4) >= 8.0
    assert no_dp.attack("loss").auc >= 0.95 and no_dp.attack("loss").tpr_at_1pct_fpr >= 0.5
    assert no_dp.attack("reference").auc >= 0.9
    assert no_dp.extraction.train_rate >= 0.1 and no_dp.extraction.heldout_rate == 0.0

    # With DP: the canaries rank like random secrets and the attacks are near chance.
    assert with_dp.exposure_at(16) <= no_dp.exposure_at(16) - 8.0
    assert max(e.exposure for e in with_dp.exposures) <= 6.0
    for attack in with_dp.attacks:
        assert 0.4 <= attack.auc <= 0.65, attack
        assert attack.tpr_at_1pct_fpr <= 0.1, attack
    assert with_dp.extraction.train_rate <= 0.02
