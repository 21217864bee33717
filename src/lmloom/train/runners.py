"""Where a training step runs: in this one process, or across a torchrun launch.

The training loop (`trainer.train_loop`) is written once; what differs between one process and many
lives here, behind one small interface:

    local_batch        which samples of the global micro-batch this process trains on
    forward_backward   loss and gradients of one micro-batch (a pipeline runs its whole schedule)
    clip               the global gradient norm, clipped, whatever holds the gradients
    mean               a scalar averaged over the data-parallel ranks (every rank sees the same loss)
    evaluate           the validation loss, the same number on every rank
    latest/load/save   checkpoints: `checkpoint.py` (encrypted when the run is) in one process,
                       `dist_checkpoint.py` (DCP: sharded, reshardable, crash-safe) under torchrun
    full_state         the whole model's weights on rank 0, in the Decoder's own names and layout

`LocalRunner` keeps the single-process behaviour exactly as it was; `ParallelRunner` wraps a model that
`parallel.parallelize` has already split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lmloom.train import dist_checkpoint as dcp_ckpt
from lmloom.train import parallel as par
from lmloom.train.checkpoint import (
    CheckpointCodecs,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)


def autocast(precision: str, device_type: str | None = None):
    """bf16 / fp16 autocast on fp32 master weights; fp32 runs plain. Device: CUDA when present."""
    import contextlib

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)
    return contextlib.nullcontext()


class LocalRunner:
    """One process: the whole batch, `torch.nn.utils.clip_grad_norm_`, `checkpoint.py` checkpoints."""

    is_main = True
    distributed = False

    def __init__(self, checkpoint_dir: Path, codecs: CheckpointCodecs | None = None):
        self.checkpoint_dir, self.codecs = Path(checkpoint_dir), codecs

    def local_batch(self, data, start: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch(start, micro)

    def forward_backward(self, step_model, x, y, precision: str, scale: float, scaler=None) -> torch.Tensor:
        with autocast(precision, x.device.type):
            loss = step_model(x, y)
        scaled = loss * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach().float()

    def clip(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def mean(self, value: float) -> float:
        return value

    def evaluate(self, model, batches, precision: str) -> float:
        from lmloom.train.trainer import evaluate

        return evaluate(model, batches, precision)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)

    def saved_depth(self, path: Path) -> int | None:
        return read_train_state(path, self.codecs).depth

    def load(self, path: Path, model, optimizer) -> TrainState:
        return load_checkpoint(path, model, optimizer, self.codecs)

    def save(self, model, optimizer, state: TrainState, keep: int) -> None:
        save_checkpoint(self.checkpoint_dir, model, optimizer, state, keep=keep, codecs=self.codecs)

    def full_state(self, model) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def finish(self) -> None:
        pass


class ParallelRunner:
    """A torchrun launch: `model` is what `parallel.parallelize` returned (a module, or a PipelineModel).

    Data: the global micro-batch of `batch_size` sequences is cut into equal slices, one per data-parallel
    rank (tensor- and pipeline-parallel ranks of one replica read the same slice), so the samples trained
    per step are exactly those of a single-process run. Checkpoints go through DCP, so a run saved on N
    ranks resumes on M (tensor-parallel checkpoints keep their rank-major q/k/v rows: resume them with the
    same tp). Encryption at rest of these checkpoints is not implemented: such a run is refused.
    """

    distributed = True

    def __init__(
        self,
        model,
        cfg: par.ParallelConfig,
        mesh,
        checkpoint_dir: Path,
        model_config,
        async_save: bool = False,
    ):
        self.model, self.cfg, self.mesh, self.model_config = model, cfg, mesh, model_config
        self.checkpoint_dir, self.async_save = Path(checkpoint_dir), async_save
        self.dp_rank, self.dp_size = par.data_parallel_rank(mesh)
        self.pipeline = isinstance(model, par.PipelineModel)
        self.is_main = dist.get_rank() == 0
        self.pending = None

    def local_batch(self, data, start: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if micro % self.dp_size:
            raise ValueError(
                f"a micro-batch of {micro} sequences does not split over {self.dp_size} data-parallel ranks"
            )
        local = micro // self.dp_size
        return data.batch(start + self.dp_rank * local, local)

    def forward_backward(self, step_model, x, y, precision: str, scale: float, scaler=None) -> torch.Tensor:
        if self.pipeline:
            if scale != 1.0 or scaler is not None:
                raise ValueError("pipeline parallelism runs its own micro-batches: use grad_accum 1, no fp16")
            with autocast(precision, x.device.type):
                return self.model.step(x, y)  # forward and backward of every pipeline micro-batch
        with autocast(precision, x.device.type):
            loss = step_model(x, y)
        scaled = loss * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach().float()

    def clip(self, model, max_norm: float) -> float:
        return float(par.clip_grad_norm_(self.model.parameters(), max_norm, self.mesh))

    def mean(self, value: float) -> float:
        return float(par.mean_over_data_parallel(torch.tensor(value, dtype=torch.float64), self.mesh))

    def evaluate(self, model, batches, precision: str) -> float:
        from lmloom.train.trainer import evaluate

        if not self.pipeline:
            # Every rank runs the same full validation batches through the sharded model (FSDP/TP forward
            # passes are collective), so every rank computes the same number.
            return evaluate(self.model, batches, precision)
        # A pipeline has no single module to call: rank 0 evaluates a gathered copy, the others wait.
        state = self.full_state(self.model)
        loss = torch.zeros((), dtype=torch.float64)
        if self.is_main:
            copy = self._plain_copy(state)
            loss.fill_(evaluate(copy, batches, precision))
        dist.broadcast(loss, src=0)
        return float(loss)

    def _plain_copy(self, state: dict[str, torch.Tensor]):
        from lmloom.models.decoder import Decoder

        copy = Decoder(self.model_config)
        copy.load_state_dict(state)
        return copy

    def latest(self) -> Path | None:
        self._wait()
        return dcp_ckpt.latest_complete(self.checkpoint_dir)

    def saved_depth(self, path: Path) -> int | None:
        return None

    def load(self, path: Path, model, optimizer) -> TrainState:
        self._wait()
        return dcp_ckpt.load_checkpoint(path, par._stage_or_module(self.model), optimizer)

    def save(self, model, optimizer, state: TrainState, keep: int) -> None:
        self._wait()  # at most one checkpoint in flight
        self.pending = dcp_ckpt.save_checkpoint(
            self.checkpoint_dir,
            par._stage_or_module(self.model),
            optimizer,
            state,
            keep=keep,
            async_save=self.async_save,
        )

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def full_state(self, model) -> dict[str, torch.Tensor]:
        """The whole model on rank 0 (collective). Pipeline stages pass their pieces to rank 0 through
        safetensors files in the checkpoint directory (no pickle); other ranks get an empty dict."""
        if not self.pipeline:
            return par.full_state_dict(self.model, cpu_offload=True)
        from safetensors.torch import load_file, save_file

        piece = par.full_state_dict(self.model, cpu_offload=False)
        pp_rank = self.mesh["pp"].get_local_rank()
        leads = all(self.mesh[d].get_local_rank() == 0 for d in ("dp_replicate", "dp_shard", "tp"))
        folder = self.checkpoint_dir / "gather"
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if leads:
            tensors = {k: v.detach().cpu().contiguous() for k, v in piece.items()}
            save_file(tensors, str(folder / f"stage-{pp_rank}.safetensors"))
        dist.barrier()
        state: dict[str, torch.Tensor] = {}
        if self.is_main:
            for stage in range(self.cfg.pp):
                state.update(load_file(str(folder / f"stage-{stage}.safetensors")))
        dist.barrier()
        if self.is_main:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        return state

    def finish(self) -> None:
        self._wait()
