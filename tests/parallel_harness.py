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
import shutil
import signal
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


def _snapshot(directory: Path) -> dict[Path, Optional[bytes]]:
    """Every path under `directory`, with the bytes of its small files (a checkpoint directory's `latest`)."""
    return {p: p.read_bytes() if p.is_file() and p.stat().st_size < 4096 else None for p in directory.rglob("*")}


def _restore(directory: Path, snapshot: dict[Path, Optional[bytes]]) -> None:
    """`directory` as `snapshot` found it: what a run added removed, its small files' bytes put back."""
    for p in sorted(directory.rglob("*"), reverse=True):  # children before their directories
        if p not in snapshot:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif snapshot[p] is not None and p.read_bytes() != snapshot[p]:
            p.write_bytes(snapshot[p])


NATIVE_CRASHES = (-signal.SIGSEGV, -signal.SIGBUS)  # multiprocessing's exitcode: minus the signal


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

    def run(self, world: int, overrides: list[str], out: Path, timeout_s: float = 180.0, die: Optional[dict] = None,
            rerun_native_crash: bool = True):
        """Trains on ranks 0..world-1 of the pool; returns the logging rank's TrainResult. Raises
        AssertionError with every failing rank's message. `die` {rank: step} makes ranks crash.
        A rank killed by a segmentation fault inside torch's native code (gloo's TCP transport, seen once in
        ~900 CI tests under load and never reproduced in isolation) reruns the run once on a fresh pool, saying so:
        the run is deterministic, so a crash our code causes crashes again and fails."""
        if not self.procs:
            self._start()
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.pt").unlink(missing_ok=True)
        before = _snapshot(out)
        port = free_port()
        for rank in range(world):
            self.tasks[rank].put((rank, world, port, overrides, str(out), (die or {}).get(rank)))
        errors, lost = self.collect(world, timeout_s)
        crashed = {r: self.procs[r].exitcode for r in range(world) if self.procs[r].exitcode in NATIVE_CRASHES}
        if lost:
            self.close()  # a rank died or may still wait in a collective: start over
        if crashed and die is None and rerun_native_crash:
            print(f"ranks {sorted(crashed)} crashed in native code (exit codes {sorted(set(crashed.values()))}); "
                  "rerunning once", flush=True)
            _restore(out, before)  # the crashed attempt's checkpoints and logs would make the rerun another run
            return self.run(world, overrides, out, timeout_s, rerun_native_crash=False)
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

