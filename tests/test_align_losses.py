"""The alignment maths of lmloom.align checked against TRL 1.16 (an independent reference) and by hand.

TRL keeps its DPO and GRPO losses inside trainer methods (`DPOTrainer._compute_loss`,
`GRPOTrainer._compute_loss`), not in free functions, and building a real trainer needs a Hugging Face model,
datasets and accelerate. So those methods are called unbound with a stub `self` (a SimpleNamespace) that
carries exactly the fields they read, and a stub `model` whose forward returns the per-token log-probs we
chose; everything else on the path is TRL's own code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmloom.align.grpo import GRPOConfig, aggregate_loss, group_advantages, grpo_loss, k3_kl
from lmloom.align.logprobs import per_token_logprobs, sequence_logprobs
from lmloom.align.preference import PreferenceConfig, preference_loss, preference_loss_from_config
from lmloom.align.reward import RewardModel, bradley_terry_loss, last_token_index, pairwise_accuracy
from lmloom.models.decoder import Decoder, DecoderConfig


def _trl(module: str):
    """A TRL module, imported on first use: without TRL only the comparisons skip, not the hand checks."""
    return pytest.importorskip(f"trl.trainer.{module}")


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine run far faster on one thread than contending for two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics():
    return defaultdict(lambda: defaultdict(list))


def _identity_accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
        unwrap_model=lambda m: m,
    )


# --------------------------------------------------------------------------------------------- DPO family


def _dpo_batch(B=6, L=12, seed=0):
    """Random [2B, L+1] completion masks (2-token prompt, 1..L-1 completion tokens, then padding), per-token
    log-probs that are 0 off the (shifted) completion, as TRL's fused head returns, and reference sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L - 1, (2 * B,), generator=g)
    pos = torch.arange(L + 1)
    completion_mask = ((pos >= 2) & (pos < 2 + lengths[:, None])).long()
    per_token = -torch.rand(2 * B, L, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * B, generator=g, dtype=torch.float64) * 2
    return completion_mask, per_token, ref


def _trl_dpo(loss_type, beta, label_smoothing, completion_mask, per_token, ref):
    """TRL's DPOTrainer._compute_loss on our log-probs: precomputed reference, reverse-KL, no LD/WPO/aux."""
    n = per_token.shape[0]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_identity_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[: n // 2],
        "ref_rejected_logps": ref[n // 2 :],
    }
    loss = _trl("dpo_trainer").DPOTrainer._compute_loss(
        stub, lambda **kw: outputs, inputs, return_outputs=False
    )
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.3, 0.0),
     ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("robust", 0.1, 0.1), ("robust", 0.5, 0.3)],
)  # fmt: skip
def test_dpo_losses_match_trl(loss_type, beta, label_smoothing):
    completion_mask, per_token, ref = _dpo_batch(seed=int(beta * 100) + len(loss_type))
    trl_loss, trl_logged = _trl_dpo(loss_type, beta, label_smoothing, completion_mask, per_token, ref)

    logps = per_token.sum(1)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    # TRL's IPO divides each log-ratio by the completion's token count; we get the same through the lengths.
    lc, lr = completion_mask.sum(1).chunk(2)
    cfg = PreferenceConfig(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    out = preference_loss_from_config(cfg, pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)

    diff = (out.loss - trl_loss).abs().item()
    print(f"DPO {loss_type} beta={beta} ls={label_smoothing}: |ours - TRL| = {diff:.3e}")
    assert diff <= 1e-6
    for key, value in out.metrics().items():
        assert abs(value - trl_logged[key]) <= 1e-6, key
    assert abs(pc.mean().item() - trl_logged["logps/chosen"]) <= 1e-9


def test_dpo_definitions_by_hand():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -5.0, -4.0, -4.5))
    delta = (pc - rc) - (pr - rr)  # 1.0 - (-0.5) = 1.5
    beta = 0.2
    sig = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta)
    assert torch.allclose(sig.losses, torch.log1p(torch.exp(-beta * delta)))
    assert torch.allclose(sig.chosen_rewards, beta * (pc - rc)) and sig.accuracies.item() == 1.0
    hinge = preference_loss(pc, pr, rc, rr, loss_type="hinge", beta=beta)
    assert torch.allclose(hinge.losses, torch.tensor([1 - beta * 1.5], dtype=torch.float64))
    # IPO without lengths: the paper's Eq. 17 on whole-sequence log-ratios.
    ipo = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta)
    assert torch.allclose(ipo.losses, (delta - 1 / (2 * beta)) ** 2)
    # Robust at eps=0 is DPO; at eps>0 it is unbiased: its mean over a flip of the label is the clean loss.
    assert torch.allclose(preference_loss(pc, pr, rc, rr, loss_type="robust", beta=beta).losses, sig.losses)
    eps = 0.2
    rob = preference_loss(pc, pr, rc, rr, loss_type="robust", beta=beta, label_smoothing=eps).losses
    rob_flipped = preference_loss(pr, pc, rr, rc, loss_type="robust", beta=beta, label_smoothing=eps).losses
    assert torch.allclose((1 - eps) * rob + eps * rob_flipped, sig.losses)


def test_preference_config_fails_closed():
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceConfig(loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError):
        PreferenceConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        PreferenceConfig(loss_type="kto")
    assert PreferenceConfig(reference="precomputed").reference == "precomputed"
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss_from_config(PreferenceConfig(loss_type="ipo"), x, x, x, x)


# --------------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand_and_with_trl_nanstd():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, float("nan"), 1.0, 2.0])
    adv = group_advantages(rewards, num_generations=4)
    std1 = math.sqrt((1.5**2 + 0.5**2) * 2 / 3)  # Bessel-corrected, as TRL
    expected1 = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std1 + 1e-4)
    assert torch.allclose(adv[:4], expected1, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))  # equal rewards: no signal
    # NaN (unscorable) left out of the group's mean/std and given advantage 0: group {0, 1, 2}, std 1.
    assert torch.allclose(adv[8:], torch.tensor([-1.0, 0.0, 0.0, 1.0]) / (1 + 1e-4), atol=1e-6)

    # The same lines as TRL's _generate_and_score_completions ("sum_then_normalize"), with TRL's nanstd.
    def trl_advantages(r, n, scale):
        mean = torch.nanmean(r.view(-1, n), dim=1).repeat_interleave(n, dim=0)
        if scale in ("group", "none"):
            std = _trl("utils").nanstd(r.view(-1, n), dim=1).repeat_interleave(n, dim=0)
        else:
            std = _trl("utils").nanstd(r).expand_as(r)
        a = r - mean
        if scale != "none":
            a = a / (std + 1e-4)
        return torch.nan_to_num(a, nan=0.0)

    g = torch.Generator().manual_seed(1)
    r = torch.randn(24, generator=g)
    r[5] = float("nan")
    for scale in ("group", "batch", "none"):
        diff = (group_advantages(r, 6, scale) - trl_advantages(r, 6, scale)).abs().max().item()
        print(f"GRPO advantages scale_rewards={scale}: max |ours - TRL| = {diff:.3e}")
        assert diff <= 1e-6


def test_k3_kl_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -2.0, -0.1])
    expected = torch.tensor([math.exp(-1) + 1 - 1, 0.0, math.exp(0.4) - 0.4 - 1])
    assert torch.allclose(k3_kl(logp, ref), expected)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def _grpo_batch(N=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    logps = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    old = logps + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3  # off-policy: some clipping
    ref = logps + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return mask, logps, old, ref, adv


def _trl_grpo(args, mask, logps, old, ref, adv):
    """TRL's GRPOTrainer._compute_loss with `logps` as the model's per-token log-probs."""
    N, T = mask.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        loss_type=args.loss_type,
        max_completion_length=args.max_completion_length,
        args=SimpleNamespace(
            use_bias_correction_kl=args.use_bias_correction_kl, delta=args.delta, steps_per_generation=1
        ),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        accelerator=_identity_accelerator(),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=_metrics(),
    )
    inputs = {
        "prompt_ids": torch.zeros(N, 2, dtype=torch.long),
        "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    loss = _trl("grpo_trainer").GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def test_trl_default_grpo_loss_type_is_dapo():
    defaults = _trl("grpo_trainer").GRPOConfig.__dataclass_fields__
    assert defaults["loss_type"].default == "dapo" == GRPOConfig().loss_type
    assert defaults["scale_rewards"].default == "group" == GRPOConfig().scale_rewards
    assert defaults["use_bias_correction_kl"].default is True is GRPOConfig().use_bias_correction_kl
    assert defaults["epsilon"].default == GRPOConfig().epsilon and defaults["beta"].default == 0.0


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # TRL's defaults: dapo, beta 0
        {"beta": 0.04},
        {"beta": 0.04, "use_bias_correction_kl": False, "epsilon_high": 0.28},
        {"beta": 0.1, "delta": 1.5, "loss_type": "grpo"},
        {"loss_type": "bnpo", "epsilon": 0.1},
        {"loss_type": "dr_grpo", "max_completion_length": 9, "beta": 0.02},
    ],
)
def test_grpo_loss_and_grad_match_trl(overrides):
    cfg = GRPOConfig(**overrides)
    mask, logps, old, ref, adv = _grpo_batch(seed=len(overrides))
    ours_in = logps.clone().requires_grad_()
    trl_in = logps.clone().requires_grad_()
    trl_loss, logged = _trl_grpo(cfg, mask, trl_in, old, ref, adv)
    out = grpo_loss(cfg, ours_in, old, adv, mask, ref)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_in)
    (our_grad,) = torch.autograd.grad(out.loss, ours_in)
    diff = (out.loss - trl_loss).abs().item()
    gdiff = (our_grad - trl_grad).abs().max().item()
    print(f"GRPO {overrides}: |loss diff| = {diff:.3e}, max |grad diff| = {gdiff:.3e}")
    assert diff <= 1e-6 and gdiff <= 1e-6
    m = mask.bool()
    assert abs(out.low_clipped[m].float().mean().item() - logged["clip_ratio/low_mean"]) <= 1e-9
    assert abs(out.high_clipped[m].float().mean().item() - logged["clip_ratio/high_mean"]) <= 1e-9
    if cfg.beta:
        kl = out.kl * out.ratio if cfg.use_bias_correction_kl else out.kl  # TRL logs the corrected KL
        assert abs(kl[m].mean().item() - logged["kl"]) <= 1e-9


def test_grpo_on_policy_gradient_by_hand():
    # On-policy, beta 0: ratio 1, nothing clipped, d loss / d logp = -A / (active tokens) on active tokens.
    mask, logps, _, _, adv = _grpo_batch(seed=3)
    x = logps.clone().requires_grad_()
    out = grpo_loss(GRPOConfig(), x, None, adv, mask)
    (grad,) = torch.autograd.grad(out.loss, x)
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(grad, expected)
    assert torch.allclose(out.loss, -(adv[:, None] * mask).sum() / mask.sum())
    # dapo with a global token count (accumulation / several devices) just changes the divisor.
    total = 3 * mask.sum()
    assert torch.allclose(
        aggregate_loss(out.per_token_loss, mask, num_items=total), out.loss * mask.sum() / total
    )


# ------------------------------------------------------------------------------------------- log-probs


def _tiny_decoder(vocab=48, seq_len=24, seed=0):
    torch.manual_seed(seed)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=vocab, seq_len=seq_len, n_layers=1))


def test_sequence_logprobs_match_naive_log_softmax(one_thread):
    model = _tiny_decoder()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (4, 16), generator=g)
    mask = torch.zeros(4, 16, dtype=torch.long)
    for b, (s, e) in enumerate([(3, 16), (5, 11), (1, 2), (8, 8)]):  # the last row has no completion
        mask[b, s:e] = 1

    naive_tok = torch.log_softmax(model(ids).float(), dim=-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    naive = (naive_tok * mask[:, 1:]).sum(1)
    (naive_grad,) = torch.autograd.grad(naive.sum(), model.tok_emb.weight)

    ours = sequence_logprobs(model, ids, mask, chunk_elems=48 * 5)  # 5 rows per chunk: several chunks
    (our_grad,) = torch.autograd.grad(ours.sum(), model.tok_emb.weight)
    diff = (ours - naive).abs().max().item()
    print(f"sequence_logprobs: max |ours - naive| = {diff:.3e}")
    assert diff <= 1e-5 and ours[3].item() == 0.0
    assert torch.allclose(our_grad, naive_grad, atol=1e-6)

    with torch.no_grad():
        tok = per_token_logprobs(model, ids, mask, temperature=0.7)
        ref_tok = (
            torch.log_softmax(model(ids).float() / 0.7, -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        )
        assert torch.allclose(tok, ref_tok * mask[:, 1:], atol=1e-5)
        avg = sequence_logprobs(model, ids, mask, average=True)
        assert torch.allclose(avg[:3], naive[:3].detach() / mask[:3, 1:].sum(1), atol=1e-5)


# ----------------------------------------------------------------------------------------- reward model


def test_bradley_terry_loss_and_its_gradient():
    rc = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    rr = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    loss.backward()
    d = (rc - rr).detach()
    assert torch.allclose(loss, -F.logsigmoid(d).mean())
    assert torch.allclose(rc.grad, -torch.sigmoid(-d) / 3) and torch.allclose(rr.grad, -rc.grad)
    margin = torch.tensor([0.5, 0.0, 1.0])
    assert torch.allclose(bradley_terry_loss(rc, rr, margin), -F.logsigmoid(d - margin).mean())
    centred = bradley_terry_loss(rc, rr, center_rewards_coefficient=0.01)
    assert torch.allclose(centred, loss + 0.01 * ((rc + rr) ** 2).mean())
    assert pairwise_accuracy(rc, rr) == pytest.approx(1 / 3)


PAD, VOCAB = 0, 64


def _preference_pairs(n, generator, T=10):
    """Separable synthetic pairs: a shared random prompt, then a completion of neutral tokens in which one
    token is 'good' (ids 1-8) for the chosen answer and 'bad' (ids 9-16) for the rejected one; right padding
    with PAD, which never appears elsewhere."""
    prompt_len = torch.randint(2, 5, (n,), generator=generator)
    comp_len = torch.randint(2, 5, (n,), generator=generator)
    chosen = torch.full((n, T), PAD)
    rejected = torch.full((n, T), PAD)
    for i in range(n):
        p, c = prompt_len[i].item(), comp_len[i].item()
        seq = torch.randint(17, VOCAB, (p + c,), generator=generator)
        slot = p + torch.randint(0, c, (1,), generator=generator).item()
        chosen[i, : p + c], rejected[i, : p + c] = seq, seq
        chosen[i, slot] = torch.randint(1, 9, (1,), generator=generator)
        rejected[i, slot] = torch.randint(9, 17, (1,), generator=generator)
    return chosen, rejected


def test_reward_gradient_flows_only_where_expected(one_thread):
    torch.manual_seed(0)
    rm = RewardModel.from_config(DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=16, n_layers=1))
    chosen, rejected = _preference_pairs(4, torch.Generator().manual_seed(0))
    cm, rjm = (chosen != PAD).long(), (rejected != PAD).long()
    assert torch.equal(last_token_index(cm), cm.sum(1) - 1)
    rc, rr = rm(chosen, cm), rm(rejected, rjm)
    bradley_terry_loss(rc, rr).backward()
    # The padding after the last real token cannot reach the reward: the PAD embedding gets no gradient...
    assert torch.count_nonzero(rm.trunk.tok_emb.weight.grad[PAD]) == 0
    # ...while the tokens that are there, the blocks and the score head do.
    assert rm.trunk.tok_emb.weight.grad[chosen[0, 0]].abs().sum() > 0
    assert rm.score.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rm.trunk.layers.parameters())
    # ...and changing the padding does not change the reward.
    with torch.no_grad():
        noisy = torch.where(cm.bool(), chosen, torch.randint(17, VOCAB, chosen.shape))
        assert torch.allclose(rm(noisy, cm), rc.detach(), atol=1e-6)


def test_tiny_reward_model_learns_separable_preferences(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cfg = DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=16, n_layers=1, d_model=64, n_heads=2)
    rm = RewardModel.from_config(cfg)
    train_c, train_r = _preference_pairs(256, g)
    test_c, test_r = _preference_pairs(256, g)

    def held_out_accuracy():
        with torch.no_grad():
            return pairwise_accuracy(rm(test_c, (test_c != PAD).long()), rm(test_r, (test_r != PAD).long()))

    acc_before = held_out_accuracy()
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3, weight_decay=0.0)
    steps, batch = 50, 32
    for _ in range(steps):
        idx = torch.randint(0, 256, (batch,), generator=g)
        c, r = train_c[idx], train_r[idx]
        loss = bradley_terry_loss(rm(c, (c != PAD).long()), rm(r, (r != PAD).long()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval()
    acc = held_out_accuracy()
    print(
        f"reward model: held-out pairwise accuracy {acc_before:.3f} at init, {acc:.3f} after {steps} steps "
        f"(last batch loss {loss.item():.4f})"
    )
    assert acc >= 0.9


def _matching_pairs(n, generator, P=6, A=4):
    """Pairs only relevance separates: a prompt of P distinct 'topic' tokens; the chosen answer repeats A of
    them, the rejected one A tokens of another prompt's topic (the built-in pairs' "answer to a different
    question" in miniature). Both answers are equally fluent, so no single token says which is which."""
    T = 1 + P + A
    topics = torch.stack([torch.randperm(VOCAB - 1, generator=generator)[: 2 * P] + 1 for _ in range(n)])
    prompt, other = topics[:, :P], topics[:, P:]

    def pick(source):
        return torch.gather(
            source, 1, torch.stack([torch.randperm(P, generator=generator)[:A] for _ in range(n)])
        )

    start = torch.full((n, 1), 1)
    chosen = torch.cat([start, prompt, pick(prompt)], 1)
    rejected = torch.cat([start, prompt, pick(other)], 1)
    answer = torch.zeros(n, T, dtype=torch.long)
    answer[:, 1 + P :] = 1
    return chosen, rejected, torch.ones(n, T, dtype=torch.long), answer


def test_relevance_pooling_ignores_padding_and_needs_the_answer_mask(one_thread):
    torch.manual_seed(0)
    cfg = DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=16, n_layers=2)
    rm = RewardModel.from_config(cfg, "relevance")
    assert rm.score.in_features == 3 * cfg.d_model  # the last token + one relevance term per block
    chosen, _ = _preference_pairs(4, torch.Generator().manual_seed(0))
    attention = (chosen != PAD).long()
    answer = attention.clone()
    answer[:, :2] = 0  # every synthetic prompt is at least 2 tokens
    reward = rm(chosen, attention, answer)
    with torch.no_grad():
        noisy = torch.where(attention.bool(), chosen, torch.randint(17, VOCAB, chosen.shape))
        assert torch.allclose(rm(noisy, attention, answer), reward, atol=1e-6)
    with pytest.raises(ValueError, match="completion_mask"):
        rm(chosen, attention)
    # A frozen trunk: only the head learns, and the trunk builds no graph.
    rm.trunk.requires_grad_(False)
    bradley_terry_loss(
        rm(chosen, attention, answer), rm(chosen.flip(0), attention.flip(0), answer.flip(0))
    ).backward()
    assert rm.score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in rm.trunk.parameters())


@pytest.mark.parametrize("pooling", ["last", "relevance"])
def test_relevance_pooling_learns_what_the_last_token_cannot(one_thread, pooling):
    """Issue 7: the reward model was at chance on the built-in pairs, whose rejected answer is mostly a fluent
    answer to another question. A linear head on a frozen trunk's last token cannot tell such answers
    apart; with the prompt-answer relevance term it can."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = DecoderConfig.preset("tiny", vocab_size=VOCAB, seq_len=16, n_layers=1, d_model=64, n_heads=2)
    rm = RewardModel.from_config(cfg, pooling)
    rm.trunk.requires_grad_(False)
    train, test = _matching_pairs(512, g), _matching_pairs(256, g)
    opt = torch.optim.AdamW(rm.score.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(60):
        idx = torch.randint(0, 512, (32,), generator=g)
        c, r, attention, answer = (x[idx] for x in train)
        loss = bradley_terry_loss(rm(c, attention, answer), rm(r, attention, answer))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        c, r, attention, answer = test
        acc = pairwise_accuracy(rm(c, attention, answer), rm(r, attention, answer))
    print(f"{pooling} pooling, head only: held-out pairwise accuracy {acc:.3f}")
    if pooling == "relevance":
        assert acc >= 0.9
    else:
        assert acc <= 0.65
