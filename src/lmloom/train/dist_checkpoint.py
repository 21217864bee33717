"""Distributed checkpoints: sharded, reshardable, crash-safe, with no pickle that we did not verify first.

A checkpoint is a directory `step-00000123/` written by every rank together:

    .metadata, __<rank>_0.distcp   model + optimizer tensors, written by `torch.distributed.checkpoint`
                                   (DCP); each rank writes its own shards, any world size can read them
    train_state.json               step, data position, tokens, extra dict, optimizer param groups and any
                                   non-tensor optimizer state (rank 0)
    rank-00000.json ...            each rank's RNG states (torch, CUDA, Python `random`)
    COMPLETE.json                  the completion marker: step, world size and sha256 of every file above

Tensors and state come from `torch.distributed.checkpoint.state_dict.get_state_dict`, so the same code
saves a plain model, a DDP model and an FSDP2 (`fully_shard`) model, and keys are the plain module's
fully qualified names whatever the wrapping. DCP stores a sharded tensor as its pieces plus their
offsets, so a checkpoint saved by 2 ranks loads on 1 (or 4) and vice versa: that is resharding.
Without a process group (one process, no `torchrun`) everything works the same way.

Crash safety: every rank writes into `step-00000123.tmp/`. Only after all ranks have finished (a
barrier) does rank 0 hash the files, write COMPLETE.json and rename the directory to its final name,
so a job killed mid-write leaves a `.tmp` directory that `latest_complete` ignores (and removes), and
the previous good checkpoint stays the latest. Redoing a step that already has a checkpoint moves the
old one aside as `.old` until the new one is in place.

Pickle: DCP writes tensors with `torch.save` and reads them with `torch.load(weights_only=True)`, but
its `.metadata` index is a plain pickle (read with `pickle.load`) and any non-tensor value in the
state dict would be pickled too. So non-tensor state never reaches DCP (it goes to JSON), and `load`
verifies every file against COMPLETE.json before DCP opens anything: a tampered `.metadata` is refused
before it is unpickled. Put checkpoints where only the training job can write.

Async save (`async_save=True`) stages a copy of the state in memory, writes it from a background
thread over a dedicated gloo process group, and returns a `PendingCheckpoint`; its `wait()` (called by
every rank, before the next save and at the end) joins the writer, then runs the same barrier + marker
+ rename, so an async checkpoint is equally crash-safe.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmloom.artifacts.atomic import fsync_dir, write_text_atomic
from lmloom.errors import IntegrityError
from lmloom.train.checkpoint import TrainState

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
MARKER = "COMPLETE.json"
TRAIN_STATE = "train_state.json"
FORMAT = "lmloom-dcp-1"
_NAME = re.compile(r"^step-(\d{8})(\.tmp|\.old)?$")


# -- process-group helpers: everything degrades to a single process without one -------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier(group: Any = None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _all_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (a tensor all-reduce, no pickle)."""
    if not _distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' on every call without a process group: we mean it."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"{PREFIX}{step:08d}"


# -- finding checkpoints ---------------------------------------------------------------------------


def list_complete(directory: Path) -> list[Path]:
    """Complete checkpoints (final name and a completion marker), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and match.group(2) is None and (path / MARKER).is_file():
            found.append(path)
    return sorted(found)


def latest_complete(directory: Path, cleanup: bool = True) -> Path | None:
    """The newest complete checkpoint, or None. Incomplete `.tmp` directories are never returned.

    Under a process group it is a collective (call it on every rank): rank 0 looks, all get its answer.

    With `cleanup` (rank 0 only, and only while no save is in flight, e.g. at start-up), leftovers of
    an interrupted save are removed and an `.old` checkpoint whose replacement never landed is put back.
    """
    directory = Path(directory)
    step = -1
    if _rank() == 0:
        if cleanup and directory.is_dir():
            _recover(directory)
        found = list_complete(directory)
        step = int(_NAME.match(found[-1].name).group(1)) if found else -1
    if _distributed():  # rank 0 decides, so every rank resumes from the same one
        chosen = torch.tensor([step], dtype=torch.int64)
        dist.broadcast(chosen, src=0)
        step = int(chosen.item())
    return step_dir(directory, step) if step >= 0 else None


def _recover(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if not match or not path.is_dir():
            continue
        if match.group(2) == TMP_SUFFIX:
            shutil.rmtree(path, ignore_errors=True)
        elif match.group(2) == OLD_SUFFIX:
            final = directory / path.name[: -len(OLD_SUFFIX)]
            if (final / MARKER).is_file() or not (path / MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)  # the replacement landed (or the old one was junk)
            else:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(path, final)
    fsync_dir(directory)


def read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        raise IntegrityError(f"checkpoint {path}: {MARKER} is missing or damaged (incomplete)") from None
    if marker.get("format") != FORMAT:
        raise IntegrityError(f"checkpoint {path}: unknown format {marker.get('format')!r}")
    return marker


def verify(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its marker; return the marker. Raises IntegrityError."""
    path = Path(path)
    marker = read_marker(path)
    files = marker["files"]
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != MARKER}
    if present - files.keys():
        raise IntegrityError(f"checkpoint {path}: unexpected files {sorted(present - files.keys())[:3]}")
    for name, digest in files.items():
        if name not in present:
            raise IntegrityError(f"checkpoint {path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise IntegrityError(f"checkpoint {path}: {name} does not match its checksum (altered)")
    return marker


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- state: tensors for DCP, everything else for JSON ------------------------------------------------


def _split_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """(tensor tree for DCP, JSON-able rest). Keys are plain FQNs for plain, DDP and FSDP2 models."""
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        optim_sd: dict[str, Any] = {"state": {}, "param_groups": []}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    for key, value in model_sd.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state {key!r} is a {type(value).__name__}, not a tensor")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entries in optim_sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(fqn, {})[name] = value
            else:
                scalars.setdefault(fqn, {})[name] = value
    rest = {"param_groups": optim_sd["param_groups"], "optim_scalars": scalars}
    return {"model": model_sd, "optim": {"state": tensors}}, rest


def _rng_state() -> dict[str, Any]:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode("ascii")

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# -- saving ----------------------------------------------------------------------------------------


@dataclass
class PendingCheckpoint:
    """A save whose tensors may still be being written; `wait()` (on every rank) finishes it."""

    directory: Path
    tmp: Path
    final: Path
    step: int
    keep: int
    group: Any = None
    future: Any = None  # DCP's future for an async save, None when the tensors are already written
    seconds_blocked: float = 0.0  # time the training loop spent inside save_checkpoint
    _path: Path | None = field(default=None, repr=False)

    def done(self) -> bool:
        return self._path is not None

    def wait(self) -> Path:
        """Join the writer, then barrier; rank 0 marks the checkpoint complete and renames it."""
        if self._path is not None:
            return self._path
        if self.future is not None:
            self.future.result()
        _barrier(self.group)  # every rank's shards and rank file are on disk
        if _rank() == 0:
            _commit(self)
        _barrier(self.group)  # nobody reads the directory before it has its final name
        self._path = self.final
        return self.final


_async_group: Any = None


def _checkpoint_group() -> Any:
    """A gloo group of its own for async writes, so their collectives never interleave with training's."""
    global _async_group
    if _async_group is None and _distributed():
        _async_group = dist.new_group(backend="gloo")
    return _async_group


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: TrainState,
    keep: int = 2,
    async_save: bool = False,
) -> PendingCheckpoint:
    """Save on every rank (a collective). Returns a PendingCheckpoint; call `.wait()` on every rank.

    Synchronous saves are finished (marker written, renamed) before this returns unless `async_save`,
    in which case only the in-memory staging has happened and the writing goes on in the background.
    """
    started = time.perf_counter()
    directory = Path(directory)
    final = step_dir(directory, state.step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # the remains of an interrupted save of this same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    tensors, rest = _split_state(model, optimizer)
    write_text_atomic(tmp / _rank_file(_rank()), json.dumps({"rank": _rank(), "rng": _rng_state()}))
    if _rank() == 0:
        meta = {
            "train": state.to_json(),
            "world_size": _world(),
            "param_groups": rest["param_groups"],
            "optim_scalars": rest["optim_scalars"],
        }
        write_text_atomic(tmp / TRAIN_STATE, json.dumps(meta))
    pending = PendingCheckpoint(directory, tmp, final, state.step, keep)
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    if async_save:
        pending.group = _checkpoint_group()
        with _single_process_quiet():
            pending.future = dcp.async_save(
                tensors, storage_writer=writer, process_group=pending.group, no_dist=not _distributed()
            )
        pending.seconds_blocked = time.perf_counter() - started
        return pending
    with _single_process_quiet():
        dcp.save(tensors, storage_writer=writer, no_dist=not _distributed())
    pending.wait()
    pending.seconds_blocked = time.perf_counter() - started
    return pending


def _commit(pending: PendingCheckpoint) -> None:
    """Rank 0, after every rank finished writing: hash, mark complete, rename into place, prune."""
    tmp, final = pending.tmp, pending.final
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    marker = {
        "format": FORMAT,
        "step": pending.step,
        "world_size": _world(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    write_text_atomic(tmp / MARKER, json.dumps(marker, indent=1))
    fsync_dir(tmp)
    old = final.with_name(final.name + OLD_SUFFIX)
    if final.exists():  # a redo of this step (after a resume or a rollback): keep the old one until then
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(pending.directory)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_complete(pending.directory)[: -pending.keep]:
        shutil.rmtree(stale, ignore_errors=True)


# -- loading ---------------------------------------------------------------------------------------


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    verify_files: bool = True,
) -> TrainState:
    """Restore model (+ optimizer, + this rank's RNG) in place on every rank; return the train state.

    Works at any world size: DCP reshards. RNG states are restored for ranks that existed when the
    checkpoint was saved; a rank that did not keeps its own (seeded) generator.
    """
    path = Path(path)
    problem = ""
    if _rank() == 0:
        try:
            verify(path) if verify_files else read_marker(path)
        except IntegrityError as exc:
            problem = str(exc)
    if not _all_ok(not problem):
        raise IntegrityError(problem or f"checkpoint {path} failed verification on rank 0")
    meta = json.loads((path / TRAIN_STATE).read_text())
    tensors, _ = _split_state(model, optimizer)
    with _single_process_quiet():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not _distributed())
    if optimizer is None:
        set_model_state_dict(model, tensors["model"])
    else:
        state = {fqn: dict(entries) for fqn, entries in tensors["optim"]["state"].items()}
        for fqn, entries in meta["optim_scalars"].items():
            state.setdefault(fqn, {}).update(entries)
        groups = _retuple(meta["param_groups"], optimizer.param_groups)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict={"state": state, "param_groups": groups},
        )
    rank_file = path / _rank_file(_rank())
    if rank_file.is_file():
        _set_rng_state(json.loads(rank_file.read_text())["rng"])
    train = meta["train"]
    return TrainState(train["step"], train["sample"], train["tokens"], train.get("extra") or None)


def _retuple(groups: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON turned tuples (Adam's betas) into lists; give them back the type the optimizer uses."""
    out = []
    for group, now in zip(groups, current, strict=False):
        out.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()})
    return out


# -- whole-model export ----------------------------------------------------------------------------


def export_full_model(model: torch.nn.Module, path: Path) -> Path | None:
    """Gather the full (unsharded) model state dict and write it as one safetensors file on rank 0.

    A collective: every rank calls it. Returns the path on rank 0, None elsewhere.
    """
    path = Path(path)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    written = None
    if _rank() == 0:
        tensors, seen = {}, {}
        for key, value in full.items():
            ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            # safetensors refuses shared storage: store an alias (tied weight) as its own copy
            tensors[key] = value.detach().clone().contiguous() if ptr in seen else value.detach().contiguous()
            seen[ptr] = key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        written = path
    _barrier()
    return written


def load_full_model(model: torch.nn.Module, path: Path) -> None:
    """Load a full safetensors state dict (e.g. from `export_full_model`) into a plain or sharded model:
    rank 0 reads the file, the other ranks receive their shards by broadcast."""
    if not _distributed():
        set_model_state_dict(model, load_file(str(path)), options=StateDictOptions(full_state_dict=True))
        return
    full = load_file(str(path)) if _rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
