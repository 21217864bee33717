"""DP-SGD on the Decoder: per-sample gradients, the accountant, the config, and the train.dp_pretrain stage."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.grad_sample import GradSampleModule  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from lmloom.artifacts.store import ArtifactStore  # noqa: E402
from lmloom.config import load_recipe  # noqa: E402
from lmloom.context import RunContext  # noqa: E402
from lmloom.models.decoder import Decoder, DecoderConfig  # noqa: E402
from lmloom.models.io import model_from_files  # noqa: E402
from lmloom.pipeline import run_recipe  # noqa: E402
from lmloom.privacy.dp import (  # noqa: E402
    DPConfig,
    PrivateDecoder,
    WindowDataset,
    epsilon_for,
    make_private,
    per_sample_gradients,
)
from lmloom.privacy.dp_stage import DPPretrainConfig  # noqa: E402

SMALL = DecoderConfig.preset("tiny", vocab_size=48, seq_len=12, d_model=32, n_heads=2)


def batch(b=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 48, (b, t), generator=g), torch.randint(0, 48, (b, t), generator=g)


def naive_per_example(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1], y[i : i + 1]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_a_per_example_loop_on_the_decoder(mode):
    torch.manual_seed(0)
    model = Decoder(SMALL)
    x, y = batch()
    expected = naive_per_example(model, x, y)  # the Decoder's own forward, custom Functions and all
    got = per_sample_gradients(model, x, y, mode)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, per_sample in got.items():
        for i in range(len(x)):
            torch.testing.assert_close(per_sample[i], expected[i][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_wrapper_computes_the_decoders_loss():
    torch.manual_seed(1)
    model = Decoder(SMALL)
    x, y = batch(4)
    torch.testing.assert_close(PrivateDecoder(model)(x, y), model(x, y))
    torch.testing.assert_close(PrivateDecoder(model)(x), model(x))


def test_opacus_on_the_bare_decoder_misses_the_tied_heads_share():
    """Why the wrapper exists: Opacus cannot see the LM head computed inside the fused loss Function."""
    torch.manual_seed(0)
    model = Decoder(SMALL)
    x, y = batch()
    expected = naive_per_example(model, x, y)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    wrapped(x, y).backward()
    emb = model.tok_emb.weight.grad_sample
    assert not torch.allclose(emb[0], expected[0]["tok_emb.weight"], atol=1e-4)
    torch.testing.assert_close(
        model.norm.weight.grad_sample[0], expected[0]["norm.weight"], rtol=1e-4, atol=1e-6
    )
    wrapped._close()


def test_reported_epsilon_equals_opacus_accountants_computed_independently():
    torch.manual_seed(0)
    model = Decoder(SMALL)
    windows = np.random.default_rng(0).integers(0, 48, (200, 13))
    cfg = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, WindowDataset(windows, 12), cfg, batch_size=20, steps=300)
    assert private.sample_rate == pytest.approx(0.1)
    independent = RDPAccountant()
    for _ in range(300):
        independent.step(noise_multiplier=1.1, sample_rate=0.1)
    assert private.epsilon() == pytest.approx(independent.get_epsilon(delta=1e-3), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(1.1, 0.1, 300)]
    assert epsilon_for(1.1, 0.1, 300, 1e-3, "prv") == pytest.approx(prv.get_epsilon(delta=1e-3), rel=1e-9)


def test_target_epsilon_calibrates_the_noise_for_exactly_the_planned_steps():
    torch.manual_seed(0)
    model = Decoder(SMALL)
    windows = np.random.default_rng(0).integers(0, 48, (300, 13))
    cfg = DPConfig(target_epsilon=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, WindowDataset(windows, 12), cfg, batch_size=30, steps=137)
    assert private.delta == pytest.approx(1 / 300)  # default delta = 1/N
    eps = private.epsilon()
    assert 3.9 < eps <= 4.0
    # The engine's own accountant, stepped by the DPOptimizer, agrees with the report.
    private.module.train()
    for step in range(3):
        x, y = private.batches.batch(step * 30, 30)
        private.module(x, y).backward()
        private.optimizer.step()
        private.optimizer.zero_grad()
    assert private.spent() == pytest.approx(private.epsilon(3), rel=1e-12)


def test_poisson_batches_are_a_pure_function_of_seed_and_step():
    windows = np.arange(1000 * 13).reshape(1000, 13) % 48
    model = Decoder(SMALL)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        WindowDataset(windows, 12),
        DPConfig(noise_multiplier=1.0),
        batch_size=50,
        steps=10,
        seed=7,
    )
    sizes = [len(private.batches.indices(s)) for s in range(200)]
    assert abs(np.mean(sizes) - 50) < 3 and len(set(sizes)) > 5  # Poisson: the size varies
    np.testing.assert_array_equal(private.batches.indices(5), private.batches.indices(5))


def test_config_asks_for_one_noise_source_and_refuses_what_dp_cannot_do():
    with pytest.raises(ValidationError, match="exactly one of target_epsilon and noise_multiplier"):
        DPConfig(target_epsilon=8, noise_multiplier=1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValidationError, match="grad_sample_mode"):
        DPConfig(target_epsilon=8, grad_sample_mode="ghost")
    with pytest.raises(ValidationError, match="precision = bf16"):
        DPPretrainConfig(precision="bf16")
    with pytest.raises(ValidationError, match="guard.enabled"):
        DPPretrainConfig(guard={"enabled": True})


RECIPE = """
name: dp
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {code}, patterns: ["*.py"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 300}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.dp_pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 16
      max_steps: {steps}
      log_every: 5
      checkpoint_every: 10
      eval_every: 1000
      final_eval_windows: 32
      dp: {{target_epsilon: 5.0, delta: 1.0e-5}}
"""


def test_the_dp_stage_trains_records_epsilon_and_releases_only_private_safe_metrics(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py"):
        (code / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(code=code, steps=20))
    results = {
        r.name: r.artifact
        for r in run_recipe(load_recipe(str(recipe)), RunContext(ArtifactStore(tmp_path / "s")))
    }
    art = results["pretrain"]
    meta = art.manifest.metadata
    dp = meta["dp"]
    assert meta["steps"] == 20 and dp["steps"] == 20 and dp["delta"] == 1e-5
    assert dp["epsilon"] <= 5.0 and dp["epsilon"] == pytest.approx(
        epsilon_for(dp["noise_multiplier"], dp["sample_rate"], 20, 1e-5, "rdp"), rel=1e-12
    )
    assert "train_loss" not in meta
    records = [json.loads(line) for line in art.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "epsilon" in r] == [5, 10, 15, 20]
    assert all("loss" not in r and "grad_norm" not in r for r in records)
    eps = [r["epsilon"] for r in records if "epsilon" in r]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp["epsilon"])
    model = model_from_files(art.read_bytes)
    assert isinstance(model, Decoder) and np.isfinite(meta["val_loss"])
