"""Who this process is in a `torchrun` launch, and the few collectives the pipeline itself needs.

`torchrun --nproc_per_node N -m lmloom.cli run RECIPE` (or the `lmloom` script under torchrun) starts N
copies of the same command. Every copy plans the same recipe; stages marked `distributed` (training)
run on every rank, all others on rank 0 alone while the rest wait for the artifact id it made. Nothing
here pickles: artifact ids travel as byte tensors.

torch is imported lazily, so commands that never train (`lmloom audit verify`) do not pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

# A rank waits this long for rank 0 to finish a stage it runs alone (data preparation can take a while
# on a big corpus). A crashed rank does not make the others wait this out: torchrun's agent stops every
# worker of the group as soon as one fails.
PIPELINE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    # Started by torchrun (even with one process): training then uses the distributed code paths.
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the launch, from torchrun's environment (a single process without it)."""
    try:
        return World(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            launched="TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ,
        )
    except ValueError as exc:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None


def init() -> World:
    """Join the process group when launched by torchrun: NCCL on GPUs, gloo on CPU. Idempotent."""
    w = world()
    if not w.launched:
        return w
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)
            dist.init_process_group(
                "nccl", timeout=PIPELINE_TIMEOUT, device_id=torch.device("cuda", w.local_rank)
            )
        else:
            dist.init_process_group("gloo", timeout=PIPELINE_TIMEOUT)
    return w


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_text(text: str | None, src: int = 0) -> str:
    """`text` from rank `src` on every rank (other ranks pass None): length first, then the UTF-8 bytes."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = (text or "").encode("utf-8")
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if dist.get_rank() == src and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src)
    return bytes(buffer.cpu().tolist()).decode("utf-8")
