"""DDP, FSDP2, tensor and pipeline parallelism of the unchanged Decoder, under real torchrun on CPU (gloo).

Every mode trains the tiny Decoder (fp32, same seed, same initial weights) for 5 AdamW steps with gradient
clipping at the same global batch as one process, and must reproduce the single-process run: per-step loss,
per-step gradient norm, and the final weights (gathered with `full_state_dict`, in the Decoder's own
layout), and `load_full_state_dict` must put the same weights back. Two torchrun launches in all: the
2-process modes (and FSDP with bf16 mixed precision, compared loosely) run one after another in one
process group, then the compositions on 2x2 meshes with 4 processes (FSDP x TP, HSDP, PP x FSDP, PP x TP).

Tolerances. The parallel runs compute the same sums in a different order (all-reduce of gradients, partial
matmul sums of row-wise TP, microbatch accumulation of PP, FSDP's reduce-scatter), so results differ by
float32 rounding: a few ulps of a loss near 5.6 (ulp = 4.8e-7) and of a gradient norm near 2. We allow
LOSS_ATOL = 2e-5 (about 40 ulps) on losses and grad norms, after 5 steps of a 3e-3-learning-rate AdamW;
measured: losses within 4.8e-7 (1 ulp), grad norms within 2.6e-6. Weights: Adam divides by sqrt(v), which for gradients near zero
magnifies rounding, so a weight may move by a fraction of lr differently; WEIGHT_ATOL = 1e-4 (1/30 of
one step's update, lr = 3e-3) on every weight, measured at 7e-6 to 2e-5.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmloom.models.decoder import Decoder, DecoderConfig
from lmloom.train import parallel as par

WORKER = Path(__file__).parent / "dist" / "parallel_worker.py"
TWO_PROC_MODES = ["ddp", "fsdp", "tp", "pp_gpipe", "pp_1f1b"]
FOUR_PROC_MODES = ["fsdp_tp", "hsdp", "pp_fsdp", "pp_tp"]  # compositions on 2x2 meshes
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 1e-4


def _load_worker():
    spec = importlib.util.spec_from_file_location("parallel_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, modes: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(out),
        *modes,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=out)
    results_file = out / f"results.{'-'.join(modes)}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if proc.returncode != 0 and not results:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return results


@pytest.fixture(scope="module")
def reference():
    return worker.reference_run()


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel2")
    return _torchrun(2, [*TWO_PROC_MODES, "fsdp_bf16"], out), out


@pytest.fixture(scope="module")
def four_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel4")
    return _torchrun(4, FOUR_PROC_MODES, out), out


def _check_mode(
    mode: str, results: dict, out: Path, reference, loss_atol=LOSS_ATOL, weight_atol=WEIGHT_ATOL
) -> None:
    ref_losses, ref_norms, ref_state = reference
    result = results.get(mode)
    assert result is not None, f"{mode}: no result (an earlier mode failed: {list(results)})"
    assert "error" not in result, f"{mode} failed on rank 0:\n{result['error']}"

    loss_diff = max(abs(a - b) for a, b in zip(result["losses"], ref_losses, strict=True))
    norm_diff = max(abs(a - b) for a, b in zip(result["grad_norms"], ref_norms, strict=True))
    state: dict[str, torch.Tensor] = {}
    for part in sorted(out.glob(f"{mode}.stage*.safetensors")):  # pp: one file per stage
        state |= load_file(part)
    assert set(state) == set(ref_state), f"{mode}: saved keys differ: {set(state) ^ set(ref_state)}"
    weight_diff = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    print(f"{mode}: max |dloss| {loss_diff:.2e}, |dgrad_norm| {norm_diff:.2e}, |dweight| {weight_diff:.2e}")

    assert loss_diff <= loss_atol, f"{mode} losses {result['losses']} vs single process {ref_losses}"
    assert norm_diff <= loss_atol, f"{mode} grad norms {result['grad_norms']} vs {ref_norms}"
    assert weight_diff <= weight_atol, f"{mode}: final weights differ by {weight_diff}"
    assert all(v.dtype == torch.float32 for v in state.values()), f"{mode}: saved weights are not float32"
    assert result["reload_state_diff"] == 0, (
        f"{mode}: load_full_state_dict -> full_state_dict changed weights"
    )
    if "reload_loss_diff" in result:  # the reloaded model computes the same function
        assert result["reload_loss_diff"] <= 1e-6


@pytest.mark.parametrize("mode", TWO_PROC_MODES)
def test_two_processes_match_single_process(mode, two_proc, reference):
    results, out = two_proc
    _check_mode(mode, results, out, reference)


@pytest.mark.parametrize("mode", FOUR_PROC_MODES)
def test_compositions_on_2x2_mesh_match_single_process(mode, four_proc, reference):
    results, out = four_proc
    _check_mode(mode, results, out, reference)


def test_fsdp_bf16_mixed_precision_tracks_fp32(two_proc, reference):
    """bf16 compute (8-bit mantissa, relative rounding 4e-3) with fp32 master weights and fp32 gradient
    reduction: losses and grad norms follow the fp32 run to 1e-2 (measured about 1e-3); saved weights stay
    float32. Weights are not compared: Adam's first steps move a weight whose gradient is rounding noise by
    up to lr in either direction, so bf16 and fp32 weights may differ by up to steps * lr."""
    results, out = two_proc
    _check_mode("fsdp_bf16", results, out, reference, loss_atol=1e-2, weight_atol=float("inf"))


# ----------------------------------------------------------------------------------------- in-process


def test_config_errors_are_one_line():
    tiny = DecoderConfig.preset("tiny", vocab_size=64, seq_len=16)  # 2 layers, 4 heads, ffn 384
    cases = [
        (dict(dp_shard=2, tp=2), 2, None, "world size 2"),
        (dict(pp=4), 4, tiny, "n_layers (2) is not divisible by pp (4)"),
        (dict(tp=8), 8, tiny, "n_heads (4) is not divisible by tp (8)"),
        (
            dict(tp=2),
            2,
            tiny.model_copy(update={"n_kv_heads": 1}),
            "n_kv_heads (1) is not divisible by tp (2)",
        ),
        (dict(dp_replicate=2, tp=2), 4, None, "dp_replicate (DDP) does not compose"),
        (dict(dp_replicate=2, mixed_precision="bf16"), 2, None, "needs dp_shard > 1"),
        (dict(pp=2, pp_microbatches=1), 2, None, "needs pp_microbatches >= pp"),
    ]
    for kwargs, world, model_cfg, message in cases:
        with pytest.raises(ValueError) as exc:
            par.ParallelConfig(**kwargs).check(world, model_cfg)
        assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    with pytest.raises(ValueError):
        par.ParallelConfig(pp_schedule="interleaved")


def test_qkv_permutation_gives_each_rank_whole_heads():
    H, Hkv, D, tp = 4, 2, 3, 2
    perm = par.qkv_rank_major_permutation(H, Hkv, D, tp)
    assert sorted(perm.tolist()) == list(range((H + 2 * Hkv) * D))
    rows = torch.arange((H + 2 * Hkv) * D)[perm].view(tp, -1)  # rank r's contiguous Shard(0) block
    for r in range(tp):
        q, k, v = rows[r].split([H // tp * D, Hkv // tp * D, Hkv // tp * D])
        assert q.tolist() == list(range(r * H // tp * D, (r + 1) * H // tp * D))
        assert (k - H * D).tolist() == list(range(r * Hkv // tp * D, (r + 1) * Hkv // tp * D))
        assert (v - (H + Hkv) * D).tolist() == (k - H * D).tolist()
    assert torch.equal(perm[torch.argsort(perm)], torch.arange(len(perm)))


def test_activation_checkpointing_keeps_loss_gradients_and_names():
    cfg = DecoderConfig.preset("tiny", vocab_size=64, seq_len=16)
    torch.manual_seed(0)
    plain = Decoder(cfg)
    wrapped = Decoder(cfg)
    wrapped.load_state_dict(plain.state_dict())
    par.apply_activation_checkpointing(wrapped.layers)
    assert set(wrapped.state_dict()) == set(plain.state_dict())
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    a, b = plain(x, y), wrapped(x, y)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    grads = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-7)
