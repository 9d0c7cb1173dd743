"""Runs the real training entry, `megatron_llm.training.trainer.train`, on N spawned processes over gloo.

Each rank reads the tiny YAML config plus overrides, as torchrun + train.py would, with RANK,
WORLD_SIZE, MASTER_ADDR/PORT set, and joins a fresh process group. The processes are a pool that
lives for a test module: importing torch costs seconds per process, a run on the tiny model less.
A run that fails, or passes its deadline, kills the whole pool (a hung collective cannot be
recovered in place) and the next run starts a new one; the module's teardown kills what is left.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _serve(tasks: multiprocessing.Queue, replies: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)  # the pool shares the test machine's cores
    from megatron_llm.config import load_config
    from megatron_llm.parallel.dims import logging_rank
    from megatron_llm.training.trainer import train

    while (task := tasks.get()) is not None:
        rank, world, port, overrides, out, die_at_step = task
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        if die_at_step is not None:
            _die_at(die_at_step)
        try:
            cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
            result = train(cfg)
            if rank == logging_rank(cfg.parallel, world):  # on the last pipeline stage, with the channel sums
                torch.save(result, Path(out) / "result.pt")
            replies.put((rank, None))
        except BaseException as e:
            replies.put((rank, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def _die_at(step: int) -> None:
    """This process exits abruptly (no cleanup, as a crashed node) when it reaches training step `step`."""
    import megatron_llm.training.trainer as trainer

    real, calls = trainer.train_step, iter(range(1 << 30))

    def train_step(*args, **kwargs):
        if next(calls) == step:
            os._exit(17)
        return real(*args, **kwargs)

    trainer.train_step = train_step


class Workers:
    """`size` training processes, started on first use."""

    def __init__(self, size: int):
        self.size = size
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list = []

    def _start(self) -> None:
        self.tasks = [self.ctx.Queue() for _ in range(self.size)]
        self.replies = self.ctx.Queue()
        self.procs = [self.ctx.Process(target=_serve, args=(q, self.replies), daemon=True) for q in self.tasks]
        for p in self.procs:
            p.start()

    def run(self, world: int, overrides: list[str], out: Path, timeout_s: float = 180.0, die: Optional[dict] = None):
        """Trains on ranks 0..world-1 of the pool; returns the logging rank's TrainResult. Raises
        AssertionError with every failing rank's message. `die` {rank: step} makes ranks crash."""
        if not self.procs:
            self._start()
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.pt").unlink(missing_ok=True)
        port = free_port()
        for rank in range(world):
            self.tasks[rank].put((rank, world, port, overrides, str(out), (die or {}).get(rank)))
        errors, lost = self.collect(world, timeout_s)
        if lost:
            self.close()  # a rank died or may still wait in a collective: start over
        if errors:
            raise AssertionError(f"{world}-process run failed:\n" + "\n".join(errors))
        return torch.load(out / "result.pt", weights_only=False)

    def collect(self, world: int, timeout_s: float, grace_s: float = 15.0) -> tuple[list[str], bool]:
        """Waits for `world` replies: (errors, whether a rank was lost). A rank that died or a run past
        `timeout_s` is an error; after the first error the others get `grace_s` to report theirs."""
        errors: list[str] = []
        replied: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(replied) < world and time.monotonic() < deadline:
            try:
                rank, error = self.replies.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in range(world) if r not in replied and not self.procs[r].is_alive()]
                for r in dead:
                    replied.add(r)
                    errors.append(f"rank {r}: process died (exit code {self.procs[r].exitcode})")
                    deadline = min(deadline, time.monotonic() + grace_s)
                continue
            replied.add(rank)
            if error:
                errors.append(error)
                deadline = min(deadline, time.monotonic() + grace_s)
        missing = sorted(set(range(world)) - replied)
        lost = bool(missing) or any(not self.procs[r].is_alive() for r in range(world))
        return errors + ([f"ranks {missing}: no reply in time"] if missing else []), lost

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.join()
        self.procs = []

