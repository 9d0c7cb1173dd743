"""What a long run meets besides bad data: a stop request, a launcher restart, a divergence, a refusal
at start-up, a hung rank.

- Stop request. Slurm sends SIGUSR1 before the time limit (`--signal`) and SIGTERM on preemption or
  cancellation; Kubernetes and `docker stop` send SIGTERM. The handler only records the signal; the
  loop finishes its step, saves a checkpoint and exits with REQUEUE_EXIT_CODE. A signal may reach some
  ranks and not others (`kill` of one process, nodes signalled one after another), so the decision is a
  collective: after every step each rank contributes what it received to a MAX all-reduce over the
  world, and all ranks stop after the same step. One int over gloo costs well under a millisecond.
  Before train() records signals, during the imports, train.py exits with REQUEUE_EXIT_CODE at once.
- Launcher restart. torchrun (`--max-restarts`) and a Slurm requeue start train.py again with the same
  command line; such a restart resumes from `latest` even without `checkpoint.resume auto`, because
  starting over would overwrite the checkpoints of the run it continues.
- Divergence. A checkpoint written in a NaN/Inf streak, or of weights no longer finite, would be named
  "the last good checkpoint" and would prune one that is: weights_finite lets the trainer skip it.
- A refusal at start-up. A check that only some ranks make (the lock, a directory's permissions on one
  node) must stop all of them, or the others wait in their next collective for parallel.timeout_s:
  refuse_together shares the refusals of a block of checks with one all_gather_object.
- Hung rank. Every collective waits at most `parallel.timeout_s`. gloo's timeout error does not say
  who is missing, so each rank that times out reports itself in the process group's store; after the
  same grace period the ranks that never reported are named as the hung or dead ones. (On GPU, NCCL's
  watchdog ends the process on the same timeout, with its own message.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_llm.errors import UsageError

# EX_TEMPFAIL of sysexits.h ("try again later"): launch/torchrun.sh passes it on, launch/slurm.sbatch
# requeues the job on it.
REQUEUE_EXIT_CODE = os.EX_TEMPFAIL  # 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CollectiveTimeout(UsageError):
    """A collective waited parallel.timeout_s for a rank that never came."""

    exit_code = 1


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGUSR1 are recorded instead of ending the process."""

    def __init__(self):
        self.received = 0  # the last stop signal's number; 0 when none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self) -> Optional[str]:
        """Collective over the world: the name of a stop signal if any rank received one, else None."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo, also beside NCCL
        return signal.Signals(int(flag)).name if flag else None


def weights_finite(model: torch.nn.Module) -> bool:
    """Collective over the world: every rank's parameters (its shards, its pipeline stage) are finite."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    flag = torch.stack([torch.isfinite(p).all() for p in local]).all().to("cpu", torch.int64).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # a CPU tensor: gloo, also beside NCCL
    return bool(flag)


def restarted_by_launcher() -> bool:
    """Collective: True when any rank was restarted by torchrun or belongs to a requeued Slurm job.
    torchrun counts restarts per node, and a node restarted only because another one failed keeps 0,
    so every rank must take the same decision from all the counts."""
    counts = (os.environ.get(key) or "0" for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    flag = torch.tensor([int(any(int(c) > 0 for c in counts))])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


@contextlib.contextmanager
def refuse_together() -> Iterator[None]:
    """A UsageError raised inside the block on any rank is raised on every rank. The block must hold no
    collective of its own: a rank that refuses leaves it early."""
    error: Optional[UsageError] = None
    try:
        yield
    except UsageError as e:
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, str(error) if error else None)
        first = next((m for m in messages if m), None)
        error = error or (UsageError(first) if first else None)
    if error is not None:
        raise error


@contextlib.contextmanager
def name_hung_ranks(timeout_s: float) -> Iterator[None]:
    """Turns a collective's timeout into CollectiveTimeout naming the ranks that did not report."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
        if "timed out" not in str(e).lower() or not dist.is_initialized() or dist.get_world_size() == 1:
            raise
        rank = dist.get_rank()
        silent = _silent_ranks(rank, dist.get_world_size(), grace_s=timeout_s)
        if silent is None:  # launch/torchrun.sh keeps the store in rank 0's process
            who = "the store does not answer either: rank 0, its host, is the likely one"
        elif silent:
            who = f"rank(s) {', '.join(map(str, silent))} never reported: hung or dead, see their logs"
        else:
            who = "every rank timed out: a lost connection?"
        raise CollectiveTimeout(
            f"rank {rank}: a collective waited parallel.timeout_s = {timeout_s:g} s and timed out; {who}"
        ) from None


def _silent_ranks(rank: int, world_size: int, grace_s: float) -> Optional[list[int]]:
    """Appends this rank to one key of the default store, then waits up to grace_s for the others that
    timed out too (one read per second: cheap for the store at any scale); returns the ranks missing
    from the key, or None when the store cannot be reached."""
    key = "megatron_llm/timed_out"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.append(key, f"{rank},")
        deadline = time.monotonic() + grace_s
        while True:
            reported = {int(r) for r in store.get(key).decode().split(",") if r}
            if len(reported) == world_size or time.monotonic() > deadline:
                return sorted(set(range(world_size)) - reported)
            time.sleep(1.0)
    except (RuntimeError, ValueError):  # the store lived in a process that is gone
        return None
