"""Parallelism on torch.distributed, applied from outside to the unchanged `Decoder`.

Launch under torchrun (one process per device); every process builds the same model (same seed) and calls

    info = init_distributed()                          # reads RANK / WORLD_SIZE / LOCAL_RANK
    mesh = build_mesh(pcfg, info.world_size, info.device.type)
    model = parallelize(Decoder(cfg), pcfg, mesh)     # DDP / FSDP2 / TP / AC in place, or a pipeline
    ...
    destroy_distributed()

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, tp (torchtitan's order: tp innermost, where
the traffic is heaviest). What `parallelize` does, in this order:

- tp > 1: `parallelize_module` per block: q/k/v, gate, up column-wise, proj, down row-wise (Megatron);
  the embedding, norms and head stay replicated plain tensors (no sequence/loss parallel yet).
- activation_checkpointing: each block wrapped by `checkpoint_wrapper` (non-reentrant).
- dp_shard > 1: FSDP2 `fully_shard` per block, then the root; HSDP when dp_replicate > 1 too.
- dp_replicate > 1 alone: DDP.
- pp > 1: the layers split into contiguous stages, one per pp rank (first: embedding, last: norm, head,
  loss), run by `torch.distributed.pipelining` with GPipe or 1F1B; the result has `step(inputs, targets)`.

For pp == 1 the result is a module: `loss = model(x, y); loss.backward(); clip_grad_norm_(...);
opt.step()` works unchanged. Each data-parallel rank feeds its own slice of the global batch
(`data_parallel_rank`); `loss` is that slice's mean (`mean_over_data_parallel` gives the global one).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from lmloom.config import StrictConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class ParallelConfig(StrictConfig):
    """Degrees of each kind of parallelism; their product must be the world size."""

    dp_replicate: int = Field(1, ge=1, description="data-parallel replicas (DDP alone, HSDP with dp_shard)")
    dp_shard: int = Field(1, ge=1, description="FSDP2 shards of parameters, gradients and optimizer state")
    tp: int = Field(1, ge=1, description="tensor-parallel degree (heads and MLP hidden split)")
    pp: int = Field(1, ge=1, description="pipeline stages (contiguous groups of layers)")
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int | None = Field(None, ge=1, description="None = pp (the fewest that fill the pipe)")
    activation_checkpointing: bool = Field(False, description="recompute each block in backward")
    mixed_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP MixedPrecisionPolicy: bf16 params in compute, fp32 gradient reduction"
    )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.pp

    def check(self, world_size: int, model_config=None) -> None:
        """Raise a one-line ValueError when this config cannot run on `world_size` processes / this model."""
        degrees = f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp}"
        if self.world_size != world_size:
            raise ValueError(f"parallel degrees {degrees} = {self.world_size} != world size {world_size}")
        if self.dp_replicate > 1 and self.dp_shard == 1 and (self.tp > 1 or self.pp > 1):
            raise ValueError(
                "dp_replicate (DDP) does not compose with tp/pp here; use dp_shard (FSDP) or HSDP "
                "(dp_replicate and dp_shard both > 1)"
            )
        if self.mixed_precision != "fp32" and self.dp_shard == 1:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} is FSDP's policy and needs dp_shard > 1; "
                "use the trainer's autocast otherwise"
            )
        if self.pp > 1 and self.pp_schedule == "1f1b" and self.microbatches < self.pp:
            raise ValueError(
                f"pp_schedule='1f1b' needs pp_microbatches >= pp ({self.pp}), got {self.microbatches}"
            )
        if model_config is not None:
            check_model(self, model_config)


def check_model(cfg: ParallelConfig, model_config) -> None:
    """One-line ValueErrors for a `DecoderConfig` that these degrees cannot split."""
    mc = model_config
    if cfg.pp > 1 and mc.n_layers % cfg.pp:
        raise ValueError(f"n_layers ({mc.n_layers}) is not divisible by pp ({cfg.pp}) pipeline stages")
    if cfg.tp > 1:
        for name, value in (
            ("n_heads", mc.n_heads),
            ("n_kv_heads", mc.kv_heads),
            ("ffn_hidden", mc.hidden_dim),
        ):
            if value % cfg.tp:
                raise ValueError(f"{name} ({value}) is not divisible by tp ({cfg.tp})")


# ----------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK from the environment): nccl with one GPU
    per process when CUDA is there, gloo on CPU. Without torchrun's variables: a single process, no group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistInfo(rank, world, local_rank, device)


def destroy_distributed() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(cfg: ParallelConfig, world_size: int | None = None, device_type: str = "cpu"):
    """A 4-D DeviceMesh (pp, dp_replicate, dp_shard, tp); dimensions of size 1 are kept, so every name works."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size = dist.get_world_size() if world_size is None else world_size
    cfg.check(world_size)
    shape = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def data_parallel_rank(mesh) -> tuple[int, int]:
    """(rank, size) among data-parallel replicas: which slice of the global batch this process feeds.
    tp and pp ranks of one replica feed the same data."""
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()


def mean_over_data_parallel(value: torch.Tensor, mesh) -> torch.Tensor:
    """The mean of a per-replica scalar (e.g. the loss) over all data-parallel ranks (a detached copy)."""
    value = value.detach().clone()
    for name in ("dp_replicate", "dp_shard"):
        if mesh[name].size() > 1:
            dist.all_reduce(value, group=mesh[name].get_group())
            value /= mesh[name].size()
    return value


# ----------------------------------------------------------------------------------------- tensor parallel
#
# The fused q/k/v projection's rows are [H*D of q | Hkv*D of k | Hkv*D of v]. Column-wise sharding hands
# rank r a contiguous block of rows, which would be all q for rank 0 and k, v for rank 1. So before
# sharding, the rows are permuted into rank-major order [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (q_r = q heads
# r*H/tp ... (r+1)*H/tp - 1, likewise k_r and v_r, so grouped-query heads stay with their kv head); plain
# Shard(0) then gives each rank whole heads of q, k and v in the layout the unchanged Attention reads,
# with `n_heads`/`kv_heads` set to the local counts. The permuted order lives only in the DTensor's global
# view (and in its optimizer state); `full_state_dict` / `load_full_state_dict` translate to and from the
# model's own layout. (A strided placement, DTensor's private `_StridedShard`, can say this only when q, k
# and v have equal sizes, i.e. not under grouped-query attention; a permutation works for both.)

_QKV_LAYOUT = "_lmloom_tp_qkv_layout"  # attribute on each TP-sharded Attention: (H, Hkv, D, tp)
_TIED_COPY = "_lmloom_tied_copy"  # attribute on the last pp stage's copy of a tied embedding


def qkv_rank_major_permutation(n_heads: int, kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """Row indices that turn the fused [q | k | v] rows into [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    q = torch.arange(n_heads * head_dim).view(tp, -1)
    k = n_heads * head_dim + torch.arange(kv_heads * head_dim).view(tp, -1)
    v = (n_heads + kv_heads) * head_dim + torch.arange(kv_heads * head_dim).view(tp, -1)
    return torch.cat((q, k, v), dim=1).flatten()


def apply_tensor_parallel(blocks, tp_mesh) -> None:
    """Megatron-style TP of each block: column-wise q/k/v, gate and up; row-wise proj and down (one
    all-reduce after attention, one after the MLP, in forward and backward). Block inputs and outputs stay
    replicated plain tensors, so the embedding, norms, residual stream and head need no change."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for block in blocks:
        attn = block.attn
        H, Hkv, D = attn.n_heads, attn.kv_heads, attn.head_dim
        if H % tp or Hkv % tp:
            raise ValueError(f"n_heads ({H}) and n_kv_heads ({Hkv}) must be divisible by tp ({tp})")
        with torch.no_grad():
            perm = qkv_rank_major_permutation(H, Hkv, D, tp).to(attn.qkv.weight.device)
            attn.qkv.weight.copy_(attn.qkv.weight[perm])
        plan = {
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.gate": ColwiseParallel(),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(),
        }
        parallelize_module(block, tp_mesh, plan)
        attn.n_heads, attn.kv_heads = H // tp, Hkv // tp  # what this rank's shard of q/k/v holds
        setattr(attn, _QKV_LAYOUT, (H, Hkv, D, tp))


def _qkv_layout(model: nn.Module) -> tuple[int, int, int, int] | None:
    for module in model.modules():
        layout = getattr(module, _QKV_LAYOUT, None)
        if layout is not None:
            return layout
    return None


# ----------------------------------------------------------------------------------------- AC, FSDP, DDP


def apply_activation_checkpointing(container: nn.ModuleList | nn.ModuleDict) -> None:
    """Wrap every block so its activations are recomputed in backward (non-reentrant; dropout's RNG state is
    replayed). state_dict names are unchanged: the wrapper strips its own prefix."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    keys = range(len(container)) if isinstance(container, nn.ModuleList) else list(container.keys())
    for key in keys:
        container[key] = checkpoint_wrapper(container[key], checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp(root: nn.Module, blocks, dp_mesh, mixed_precision: str) -> None:
    """FSDP2: one all-gather / reduce-scatter group per block, the rest (embedding, norm, head) in the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = mixed_precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    # A block's floating inputs are the residual stream (already bf16: it comes from bf16 weights) and the
    # RoPE cos/sin, which the Decoder keeps float32 on purpose: so blocks do not cast their inputs.
    block_mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=block_mp if bf16 else MixedPrecisionPolicy())
    fully_shard(root, mesh=dp_mesh, mp_policy=mp or MixedPrecisionPolicy())


def _params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


def _dp_mesh(cfg: ParallelConfig, mesh):
    return mesh["dp_replicate", "dp_shard"] if cfg.dp_replicate > 1 else mesh["dp_shard"]


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh) -> nn.Module | PipelineModel:
    """Apply `cfg` to a `Decoder` built identically (same seed) on every rank. pp == 1: returns the module
    (the model itself, or DDP around it) with forward(idx, targets) -> loss as before. pp > 1: returns a
    `PipelineModel` (`step(inputs, targets) -> loss` runs forward and backward)."""
    cfg.check(mesh.size(), getattr(model, "config", None))
    if cfg.pp > 1:
        return _build_pipeline(model, cfg, mesh)
    if cfg.tp > 1:
        apply_tensor_parallel(model.layers, mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    if cfg.dp_shard > 1:
        apply_fsdp(model, model.layers, _dp_mesh(cfg, mesh), cfg.mixed_precision)
    elif cfg.dp_replicate > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model.tok_emb.weight.device.index] if model.tok_emb.weight.is_cuda else None
        # The buffers (RoPE tables, causal bias) are derived from the config, equal on every rank: no sync.
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in _params(DistributedDataParallel)
            else "broadcast_buffers"
        )
        group = mesh["dp_replicate"].get_group()
        model = DistributedDataParallel(model, device_ids=device_ids, process_group=group, **{no_sync: False})
    return model


# ----------------------------------------------------------------------------------------- pipeline


class DecoderStage(nn.Module):
    """A contiguous run of a Decoder's blocks; the first stage embeds, the last normalises. Submodules are
    the Decoder's own under their own names (`layers` is a ModuleDict keyed by the original index), so a
    stage's state_dict keys are the Decoder's. With tied embeddings the last stage holds a copy of
    `tok_emb` for the head, kept equal to the first stage's by summing their gradients (`PipelineModel`)."""

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.is_first, self.is_last = first, last
        tied = model.lm_head is None
        self.tok_emb = model.tok_emb if first or (last and tied) else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last and not tied else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.tok_emb(x)
        T = x.shape[1]
        cos, sin = self.rope_cos[:T, None].float(), self.rope_sin[:T, None].float()
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        return self.norm(x) if self.is_last else x

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the last stage's output (the Decoder's own chunked head)."""
        from lmloom.models.decoder import linear_cross_entropy

        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return linear_cross_entropy(h.flatten(0, 1), weight, targets.flatten())


class PipelineModel:
    """This rank's pipeline stage and its schedule. `step(inputs, targets)` runs forward and backward of all
    microbatches (gradients accumulate in `.grad` like `loss.backward()`, scaled to the mean over
    microbatches) and returns the batch's mean loss on every pp rank. Then clip, `opt.step()`, zero_grad."""

    def __init__(
        self,
        module: DecoderStage,
        stage,
        schedule,
        microbatches: int,
        pp_group,
        tie_group,
        last_stage_rank: int,
    ):
        self.module, self.stage, self.schedule, self.microbatches = module, stage, schedule, microbatches
        self.pp_group, self.tie_group, self.last_stage_rank = pp_group, tie_group, last_stage_rank

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True) -> PipelineModel:
        self.module.train(mode)
        return self

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.module
        losses: list[torch.Tensor] = []
        n_mb = self.microbatches
        if inputs.shape[0] % n_mb:
            raise ValueError(f"batch of {inputs.shape[0]} rows does not split into pp_microbatches={n_mb}")
        if m.is_first:
            self.schedule.step(inputs)
        elif m.is_last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        if self.tie_group is not None:  # tied embedding/head: sum the two stages' gradients
            grad = m.tok_emb.weight.grad
            grad = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(grad, group=self.tie_group)
        device = next(m.parameters()).device
        loss = (
            torch.stack([x.detach().float() for x in losses]).mean()
            if losses
            else torch.zeros((), device=device)
        )
        dist.broadcast(loss, src=self.last_stage_rank, group=self.pp_group)
        return loss


def _tie_group(mesh):
    """A group of the first and last pp rank of this process's pipeline (new_group is collective: every
    rank creates every pipeline's group, in the same order)."""
    pp_dim = MESH_DIMS.index("pp")
    ranks = mesh.mesh.movedim(pp_dim, -1).reshape(-1, mesh.mesh.shape[pp_dim])
    mine = None
    for row in ranks.tolist():
        group = dist.new_group([row[0], row[-1]])
        if dist.get_rank() in (row[0], row[-1]):
            mine = group
    return mine


def _build_pipeline(model: nn.Module, cfg: ParallelConfig, mesh) -> PipelineModel:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pp_mesh = mesh["pp"]
    stage_idx, n_stages = pp_mesh.get_local_rank(), cfg.pp
    per_stage = model.config.n_layers // n_stages
    layer_ids = range(stage_idx * per_stage, (stage_idx + 1) * per_stage)
    first, last = stage_idx == 0, stage_idx == n_stages - 1
    module = DecoderStage(model, layer_ids, first, last)
    tied = model.lm_head is None
    del model  # once the caller drops the Decoder too, the other stages' blocks are freed

    if cfg.tp > 1:
        apply_tensor_parallel(module.layers.values(), mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(module.layers)
    if cfg.dp_shard > 1:
        apply_fsdp(module, module.layers.values(), _dp_mesh(cfg, mesh), cfg.mixed_precision)
    device = next(module.parameters()).device
    pp_group = pp_mesh.get_group()
    stage = PipelineStage(module, stage_idx, n_stages, device, group=pp_group)
    schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.pp_schedule]
    schedule = schedule_cls(stage, n_microbatches=cfg.microbatches, loss_fn=module.loss)
    tie_group = _tie_group(mesh) if tied else None
    if not (first or last):
        tie_group = None
    if tied and last:  # the head's copy of the embedding: clipped, but counted once in the gradient norm
        setattr(module.tok_emb.weight, _TIED_COPY, True)
    last_stage_rank = dist.get_global_rank(pp_group, n_stages - 1)
    return PipelineModel(module, stage, schedule, cfg.microbatches, pp_group, tie_group, last_stage_rank)


# ----------------------------------------------------------------------------------------- clip, state dict


def clip_grad_norm_(
    parameters, max_norm: float, mesh=None, norm_type: float = 2.0, foreach: bool | None = None
) -> torch.Tensor:
    """Clip gradients to a total norm over the whole model, whatever holds them: plain tensors, FSDP/TP
    DTensors on different meshes, and (given `mesh` with pp > 1) pipeline stages on other ranks. Returns the
    total norm before clipping, as a plain tensor, the same on every rank.

    `torch.nn.utils.clip_grad_norm_` alone works when every gradient is a DTensor on one mesh (FSDP alone)
    or all are plain (DDP), but not for a mix (TP here leaves norms and embedding replicated plain tensors)
    nor across pipeline stages; this groups the gradients by placement, as torchtitan does."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if getattr(p, _TIED_COPY, False):  # its twin on the first stage is counted
            continue
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = parameters[0].grad.device if parameters else torch.device("cpu")
    if math.isinf(norm_type):
        total = torch.stack(norms).amax() if norms else torch.zeros((), device=device)
    else:
        total = torch.stack([n**norm_type for n in norms]).sum() if norms else torch.zeros((), device=device)
    if mesh is not None and mesh["pp"].size() > 1:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=mesh["pp"].get_group())
    if not math.isinf(norm_type):
        total = total ** (1.0 / norm_type)
    # Per gradient (DTensor * a plain 0-d tensor is allowed): shards scale by the one global coefficient.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        p.grad.mul_(coef.to(p.grad.device))
    return total


def _stage_or_module(model) -> nn.Module:
    return model.module if isinstance(model, PipelineModel) else model


def full_state_dict(model, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) plain tensors under the Decoder's own state_dict names, in the Decoder's own q/k/v
    row order: collective, call on every rank. With `cpu_offload`, rank 0 alone gets the tensors (on CPU),
    the others an empty dict. Under pp each rank gets its stage's keys (tied: both end stages hold
    tok_emb.weight); merge them on one rank to save a whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = _stage_or_module(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    state = get_model_state_dict(module, options=options)
    layout = _qkv_layout(module)
    if layout is not None:
        inverse = torch.argsort(qkv_rank_major_permutation(*layout))
        for key in state:
            if key.endswith("attn.qkv.weight"):
                state[key] = state[key][inverse.to(state[key].device)]
    return state


def load_full_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Load full plain tensors in the Decoder's layout into a parallelized model (every rank passes the
    same state; under pp, the keys of its stage at least). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = _stage_or_module(model)
    layout = _qkv_layout(module)
    own = {k for k, _ in module.state_dict().items()}
    state = {k: v for k, v in state.items() if k in own} if isinstance(model, PipelineModel) else dict(state)
    if layout is not None:
        perm = qkv_rank_major_permutation(*layout)
        for key in state:
            if key.endswith("attn.qkv.weight"):
                state[key] = state[key][perm.to(state[key].device)]
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
