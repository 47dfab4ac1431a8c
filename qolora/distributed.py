"""Several processes: every rank-aware line of QOLoRA lives here and, for FSDP, in ``qolora.fsdp``.

``torchrun`` and ``accelerate launch`` start the processes and set ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; accelerate's ``PartialState`` joins them into one process group (gloo on the
CPU, nccl on CUDA) that transformers' Trainer then reuses for DDP, or that FSDP2's
``fully_shard`` shards the model over (``qolora.fsdp``). QOLoRA adds no launcher and no communication
layer; it uses ``torch.distributed``'s collectives for a barrier around the one init, per-rank
digests of the whole model before step 1 (docs/design.md, "one init, every rank"), the summed
token-weighted eval loss, and the broadcast of rank 0's base under FSDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import quant

logger = logging.getLogger(__name__)


class DistributedError(ValueError):
    """The ranks disagree (config or model): one line naming the first difference (exit 2 from the CLI)."""


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones (1 process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Where this rank loads its model: its own GPU, else the CPU (None: the loader's default)."""
        if self.size == 1:
            return None
        return {"": self.local_rank} if torch.cuda.is_available() else {"": "cpu"}


def world() -> World:
    """The launcher's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (1 process without one)."""
    env = os.environ
    try:
        return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    except ValueError as e:
        raise DistributedError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {e}") from e


def resolve_mode(mode: str, w: World) -> str:
    """``train.distributed`` for this world: "none" for one process; "auto" is "ddp" above one."""
    if w.size == 1:
        return "none"
    return "ddp" if mode == "auto" else mode


def quant_storage(mode: str) -> str | None:
    """The packed 4-bit storage a mode needs: FSDP shards the packed bytes as parameters of the
    compute dtype (FSDP-QLoRA's rule); one process and DDP keep bitsandbytes' uint8."""
    return "compute" if mode == "fsdp" else None


def setup(w: World) -> None:
    """Join the process group (once) and keep non-main ranks quiet: no progress bars from datasets.

    Transformers' Trainer later reuses this group; it hides its own bars on non-main ranks.
    """
    if w.size == 1:
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    if not w.is_main:
        import datasets

        datasets.disable_progress_bars()
    logger.info("%d processes (%s)", w.size, torch.distributed.get_backend())


def rank_prefix() -> str:
    """``[rank N] `` when launched as one of several processes, else empty (for error lines)."""
    w = world()
    return f"[rank {w.rank}] " if w.size > 1 else ""


def configure_logging(root: logging.Logger) -> None:
    """Only rank 0 logs info lines; warnings and errors of every rank name their rank."""
    w = world()
    if w.size == 1:
        return

    class RankFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.WARNING:
                return w.is_main
            if not str(record.msg).startswith("[rank "):  # once, whichever handlers see it
                record.msg = f"[rank {w.rank}] {record.msg}"
            return True

    for h in root.handlers:
        h.addFilter(RankFilter())


def exit_now(w: World, signum: int, why: str, output_dir: os.PathLike[str] | str) -> None:
    """Exit this rank at once (no unwinding: a collective may be waiting for a rank that is gone),
    with one line naming the rank, the signal and why, and 128 + the signal as the exit code."""
    print(
        f"qolora train: error: [rank {w.rank}] stopped by {signal.Signals(signum).name}: {why}; "
        f"--resume continues from the last complete checkpoint in {output_dir}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


def exit_in_one_line_on_sigterm(w: World, output_dir: os.PathLike[str] | str) -> None:
    """When one rank dies, torchrun (and accelerate launch, which runs it) sends SIGTERM to the others
    at once, so they never wait out a collective's timeout; each then says so in one line, not a
    traceback, and exits 143 (128 + SIGTERM). For processes that cannot run ``SignalStop``."""
    if w.size == 1:
        return

    def stop(signum: int, frame: Any) -> None:
        exit_now(w, signum, "the launcher stops every rank when one fails", output_dir)

    signal.signal(signal.SIGTERM, stop)


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing")


@contextlib.contextmanager
def lost_rank_as_one_line(w: World, output_dir: os.PathLike[str] | str) -> Iterator[None]:
    """A collective that fails because another rank died (gloo: "Connection closed by peer") is one
    line, as the launcher's SIGTERM is: which of the two comes first is a race."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError (nccl) is one; gloo raises a plain RuntimeError
        lost = isinstance(e, torch.distributed.DistBackendError) or any(m in str(e) for m in PEER_LOST)
        if w.size == 1 or not lost:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"lost another rank (it died or was stopped: {first[:200]}); --resume continues from the last "
            f"complete checkpoint in {output_dir}"
        ) from None


def barrier(w: World) -> None:
    if w.size > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first(w: World) -> Iterator[None]:
    """Run the body on each machine's first process, then on the others (which read its caches)."""
    if w.size == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def all_gather(obj: Any, w: World) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` for one process)."""
    if w.size == 1:
        return [obj]
    out: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, w: World) -> Any:
    """Rank 0's ``obj`` (pickled), on every rank."""
    if w.size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def device(w: World) -> torch.device:
    """This rank's device: its own GPU, else the CPU."""
    return torch.device("cuda", w.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def check_same(what: str, value: dict[str, Any], w: World) -> None:
    """Every rank holds the same ``value`` (a flat mapping); else name the first key and rank that differ."""
    values = all_gather(value, w)
    for r, v in enumerate(values):
        if v != values[0]:
            key = next((k for k in sorted(set(v) | set(values[0])) if v.get(k) != values[0].get(k)), "?")
            raise DistributedError(
                f"{what} differs between ranks: {key} is {values[0].get(key)!r} on rank 0 and {v.get(key)!r} on rank "
                f"{r}; launch every rank with the same config"
            )


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():  # bytes as stored: a NaN bit pattern in packed storage is hashed as it is
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def layer_digests(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    modules: Iterable[tuple[str, nn.Module]] | None = None,
) -> dict[str, str]:
    """sha256 per module of everything the model computes with, in module order.

    A 4-bit layer's digest covers its packed data and whole quant_state (absmax, nested absmax,
    offset, codebooks, shape, dtype, blocksize; ``quant.state_tensors``), so equal digests mean
    a bit-identical dequantized base. Other modules' digests cover their own parameters and
    buffers (LoRA factors included); ``factors`` (the initial B0, A0) are digested per layer.
    ``modules``: (name, module) pairs to digest instead of all of ``model``'s.
    """
    out: dict[str, str] = {}
    for name, m in model.named_modules() if modules is None else modules:
        h = hashlib.sha256()
        if quant.is_4bit(m):
            desc, parts = quant.state_tensors(m)
            h.update(desc.encode())
            for part, t in parts:
                h.update(part.encode())
                _hash_tensor(h, t)
            direct = [("bias", m.bias)] if getattr(m, "bias", None) is not None else []
        else:
            direct = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        for pname, t in direct:
            h.update(pname.encode())
            _hash_tensor(h, t)
        if quant.is_4bit(m) or direct:
            out[name or "<root>"] = h.hexdigest()
    for name, (B0, A0) in sorted((factors or {}).items()):
        h = hashlib.sha256()
        _hash_tensor(h, B0)
        _hash_tensor(h, A0)
        out[f"{name} (initial factors)"] = h.hexdigest()
    return out


def model_digest(layers: dict[str, str]) -> str:
    """One digest of a model from its per-layer digests."""
    return hashlib.sha256("".join(f"{k}={v};" for k, v in layers.items()).encode()).hexdigest()


def verify_same_model(
    model: nn.Module, w: World, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> list[str]:
    """Digest the model on every rank and compare; the per-rank digests, in rank order.

    Raises:
        DistributedError: on every rank, naming the first layer (in module order) whose digest
            differs from rank 0's, before any training step.
    """
    return compare_digests(layer_digests(model, factors), w)


def compare_digests(mine: dict[str, str], w: World) -> list[str]:
    """Gather every rank's per-layer digests (``layer_digests``) and compare them with rank 0's;
    the per-rank model digests, in rank order. Raises ``DistributedError`` as ``verify_same_model``."""
    gathered = all_gather(mine, w)
    digests = [model_digest(d) for d in gathered]
    ref = gathered[0]
    for r, d in enumerate(gathered):
        if digests[r] == digests[0]:
            continue
        first = next((k for k in list(ref) + list(d) if ref.get(k) != d.get(k)), "?")
        raise DistributedError(
            f"the model differs between ranks before step 1: {first} on rank {r} is not rank 0's "
            f"(digest {str(d.get(first))[:12]} against {str(ref.get(first))[:12]})"
        )
    if w.size > 1:
        logger.info(
            "init verified: the base and factors are bit-identical on all %d ranks (%s)", w.size, digests[0][:16]
        )
    return digests


def shard_batches(n: int, batch_size: int, w: World) -> Iterator[list[int]]:
    """This rank's batches of example indices r, r + N, ...; every rank yields the same number of
    batches, the ones past the end of a shorter share empty."""
    mine = list(range(w.rank, n, w.size))
    per_rank = -(-n // w.size)
    for s in range(0, max(per_rank, 1), batch_size):
        yield mine[s : s + batch_size]


def all_reduce_sum(values: list[float], w: World, device: torch.device) -> list[float]:
    """Elementwise sum over ranks, in float64."""
    if w.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
