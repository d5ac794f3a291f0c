"""One job trained by several processes: `torchrun --nproc_per_node=N -m train ...` (one node or many, also under
SLURM's `srun`), or the N tasks of a submitit job (`hydra.launcher.tasks_per_node=N`).

What each process does, and why the N-process run computes what the one-process run computes:

- **Data.** `trainer.batch_size` stays the *global* batch. Every process walks the same global batch order (a
  pure function of seed and epoch, data.BatchLoader) and takes its contiguous share of each global batch
  (`ShardedBatches`). Its loss is weighted by `share × N / global batch` (the trainer's `loss_weight`), so the
  average of the N gradients is the gradient of the mean loss over the whole global batch, also when the last
  batch does not split evenly. A process whose share is empty (a last batch smaller than N) runs one example
  with weight 0, so that it still joins the collective.
- **Gradients.** After the backward of every micro-batch of a step, one all-reduce averages the gradients of the
  trainable tensors (`average_gradients`), before the grad scaler, the hooks, clipping and the optimizer. This
  is DDP's gradient averaging done explicitly, over a flat buffer: the trainable part of an adapted model is
  small (MiniLM r8: 0.5M values), so overlapping it with the backward buys nothing, and unlike the DDP wrapper
  it allows what the methods do: switch `requires_grad` during training (xgblora's boosters), change buffers in
  hooks, and add a regularizer outside the forward. The same buffer carries the step's flags (the loss for the
  log, a non-finite loss, a stop request) so that every process takes the same decision at the same step.
- **Schedules.** Every hook then sees identical parameters and identical (averaged) gradients, so importance
  scores, masks, reallocations and booster sampling (seeded from the run seed) agree exactly. `check_agree`
  verifies it (bit for bit) before training, at every evaluation and at the end, and fails the run naming the
  first tensor that differs, rather than letting processes drift apart.
- **Randomness.** Every process builds the model from the run seed (identical init); afterwards the processes
  other than rank 0 re-seed torch, so that their dropout masks are their own and not copies of rank 0's.
- **Evaluation** is sharded: each process predicts a contiguous slice of the dev set, the predictions are
  gathered, and every process computes the same metrics.
- **Files.** Only rank 0 writes: the run directory (created by rank 0, its path broadcast to the others), the
  lock, `.hydra/`, logs, checkpoints (every process's RNG state gathered into it), the dashboard, the adapter and
  results.json. Resume reads the same checkpoint in every process.

Backend: gloo on CPU; on a machine with CUDA, NCCL for CUDA tensors and gloo for the small CPU-side exchanges
("cpu:gloo,cuda:nccl"); each process uses GPU `LOCAL_RANK`.

Without a launcher, `current()` is a single process and every operation here is a no-op: a one-process run
computes exactly what it computed before this module existed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

LOSS_WEIGHT_KEY = "loss_weight"  # the trainer multiplies a micro-batch's loss by this (training/trainer.py)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes that train one job together."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- devices and randomness -----------------------------------------------------------------------------
    def device_name(self, name: str) -> str:
        """trainer.device for this process: `auto` and `cuda` become this process's GPU (`cuda:LOCAL_RANK`)."""
        if not self.distributed:
            return name
        import torch

        if name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{local_gpu(self.local_rank)}"
        if name == "auto":
            return "cpu"
        return name

    def fork_rng(self, seed: int) -> None:
        """Give every process but rank 0 its own torch random stream (dropout masks), once the model is built.
        Rank 0 keeps the stream a one-process run has."""
        if self.rank > 0:
            import torch

            torch.manual_seed((int(seed) * 1_000_003 + self.rank * 7_919) % 2**63)

    # --- collectives (no-ops in a single process) -----------------------------------------------------------
    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_decides(self, decide: Callable[[], Any]) -> Any:
        """Rank 0 runs `decide()` (which may touch files) and every process gets its answer, or the error it raised:
        the others never wait forever on a rank 0 that failed."""
        if not self.distributed:
            return decide()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", decide())
            except Exception as e:
                outcome = ("error", _portable_error(e))
                error = e
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            if self.is_main:
                raise error
            raise _rebuild_error(outcome[1])
        return outcome[1]

    def main_first(self, work: Callable[[], Any]) -> Any:
        """`work()` on rank 0 first, then on the others (data and model loading: rank 0 fills the caches, or
        downloads, once; the others read them). An error on rank 0 ends every process with it."""
        if not self.distributed:
            return work()
        if self.is_main:
            try:
                value = work()
            except Exception as e:
                self.broadcast(("error", _portable_error(e)))
                raise
            self.broadcast(("ok", None))
            return value
        outcome = self.broadcast(None)
        if outcome[0] == "error":
            raise _rebuild_error(outcome[1])
        return work()

    def average_gradients(self, params: Sequence[Any], flags: Sequence[float]) -> list[float]:
        """Average the gradients of `params` over the processes, in place, with one all-reduce; returns the sums
        of `flags` over the processes (carried in the same buffer).

        Only tensors with requires_grad take part (the same set in every process: methods switch it by step,
        never by data). A tensor without a gradient in some process counts as zero there; one without a
        gradient in every process keeps none (AdamW then skips it, as in one process)."""
        import torch
        import torch.distributed as dist

        live = [p for p in params if p.requires_grad]
        device = live[0].device if live else torch.device("cpu")
        parts = [p.grad.detach().reshape(-1).float() if p.grad is not None
                 else torch.zeros(p.numel(), device=device) for p in live]
        has_grad = torch.tensor([float(p.grad is not None) for p in live], device=device)
        extra = torch.tensor([float(f) for f in flags], device=device)
        buffer = torch.cat(parts + [has_grad, extra])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        offset = 0
        counts = buffer[sum(p.numel() for p in live):].tolist()  # processes with a gradient, then the flags
        for i, p in enumerate(live):
            n = p.numel()
            if counts[i] > 0:
                mean = buffer[offset:offset + n].view_as(p).div_(self.world_size).to(p.dtype)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
            offset += n
        return counts[len(live):]

    def check_agree(self, tensors: dict[str, Any], extra: Any = None, what: str = "the adapter") -> None:
        """Raise TrainingError unless every process holds bit-identical `tensors` (and equal `extra`, a small
        picklable value such as the rank pattern)."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        from .errors import TrainingError

        names = sorted(tensors)
        if names:
            # float32 holds every value of these tensors exactly (fp32 weights, masks, small counters); the
            # exchange stays on their device (NCCL for CUDA tensors)
            device = tensors[names[0]].device
            flat = torch.cat([tensors[n].detach().reshape(-1).float().to(device) for n in names])
            hi, lo = flat.clone(), flat.clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            differ = (hi != lo) & ~(torch.isnan(hi) & torch.isnan(lo))
            if bool(differ.any()):
                first = int(differ.nonzero()[0])
                offset = 0
                for n in names:
                    size = tensors[n].numel()
                    if first < offset + size:
                        break
                    offset += size
                gap = float((hi - lo)[differ].abs().max())
                raise TrainingError(f"the {self.world_size} processes no longer agree on {what}: {n} differs "
                                    f"(by up to {gap:.3g}); a schedule or an initialisation that depends on "
                                    f"something other than the seed, the step and the averaged gradients")
        if extra is not None:
            seen = self.gather(extra)
            if any(s != seen[0] for s in seen[1:]):
                rank = next(r for r, s in enumerate(seen) if s != seen[0])
                raise TrainingError(f"the {self.world_size} processes no longer agree on {what}: rank {rank} has "
                                    f"{seen[rank]!r}, rank 0 {seen[0]!r}")

    # --- data -----------------------------------------------------------------------------------------------
    def share(self, n: int) -> tuple[int, int]:
        """[start, end) of this process's contiguous share of n items (sizes differ by at most one)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size


SINGLE = Processes()
_current: Processes | None = None


def current() -> Processes:
    """The processes of this job: set up by `init_from_env()`, a single process otherwise."""
    return _current or SINGLE


def launched_with_several_processes() -> bool:
    """torchrun (or srun exporting torch's variables) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def _submitit_tasks() -> int:
    """Tasks of the submitit job this process belongs to (hydra.launcher.tasks_per_node × nodes); 1 outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    try:
        import submitit

        return int(submitit.JobEnvironment().num_tasks)
    except Exception:  # not inside a submitit job after all (the variable leaked from a parent)
        return 1


def init_from_env() -> Processes:
    """Join the job's process group when a launcher started several processes; idempotent. Imports torch only
    then, so that a one-process start stays light."""
    global _current
    if _current is not None:
        return _current
    if not launched_with_several_processes():
        if _submitit_tasks() <= 1:
            _current = SINGLE
            return _current
        import submitit

        # submitit's tasks know their rank from SLURM (or its local executor); torch reads it from the env
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    import atexit

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = os.environ.get("LORABENCH_DIST_BACKEND") or (
            "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_gpu(local_rank))
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        atexit.register(_destroy)
    _current = Processes(rank=rank, world_size=world, local_rank=local_rank, backend=dist.get_backend())
    return _current


def local_gpu(local_rank: int) -> int:
    """This process's GPU: GPU LOCAL_RANK when every process sees all of the node's GPUs (torchrun, or SLURM
    without GPU binding), GPU 0 when the scheduler gave each process only its own."""
    import torch

    return local_rank % max(torch.cuda.device_count(), 1)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _portable_error(e: BaseException) -> tuple[str, str, str]:
    return type(e).__module__, type(e).__qualname__, str(e)


def _rebuild_error(info: tuple[str, str, str]) -> BaseException:
    """The exception rank 0 raised, as this process's own: the same class where it can be rebuilt from its
    message (lorabench's user errors: each process then ends with the same one line), else a RuntimeError."""
    module, name, message = info
    from . import errors

    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, errors.LorabenchError) and cls is not errors.RunInterrupted:
        return cls(message)
    return RuntimeError(f"rank 0 failed: {name}: {message}")


# --- batches ----------------------------------------------------------------------------------------------------

class ShardedBatches:
    """This process's share of every global batch of a data.BatchLoader (same order, same epochs, same resume
    position); each batch carries its `loss_weight` (see the module docstring)."""

    def __init__(self, loader, processes: Processes) -> None:
        self.loader = loader
        self.processes = processes

    # the trainer sets the epoch and the batches to skip on resume; they are the global loader's
    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.epoch = value

    @property
    def skip_batches(self) -> int:
        return self.loader.skip_batches

    @skip_batches.setter
    def skip_batches(self, value: int) -> None:
        self.loader.skip_batches = value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        loader, world = self.loader, self.processes.world_size
        order = loader.order(loader.epoch)
        size = loader.batch_size
        for b in range(loader.skip_batches, len(loader)):
            global_batch = order[b * size:(b + 1) * size]
            if not global_batch:
                break
            start, end = self.processes.share(len(global_batch))
            mine = global_batch[start:end]
            weight = len(mine) * world / len(global_batch)
            batch = loader.collate(loader.split, mine or global_batch[:1])
            batch[LOSS_WEIGHT_KEY] = torch.tensor(weight if mine else 0.0)
            yield batch


class EvalShard:
    """This process's contiguous slice of an evaluation loader's examples (in order), in batches."""

    def __init__(self, loader, processes: Processes) -> None:
        self.loader = loader
        self.start, self.end = processes.share(len(loader.split))

    def __len__(self) -> int:
        return -(-(self.end - self.start) // self.loader.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        size = self.loader.batch_size
        for s in range(self.start, self.end, size):
            yield self.loader.collate(self.loader.split, list(range(s, min(s + size, self.end))))


def shard_loaders(loaders: dict[str, Any], processes: Processes) -> dict[str, Any]:
    return {k: EvalShard(v, processes) for k, v in loaders.items()} if processes.distributed else loaders


def first_signal(processes: Processes, requested: int | None) -> int | None:
    """The stop signal the processes act on together: the first one any process received, by rank."""
    return next((s for s in processes.gather(requested) if s is not None), None)
