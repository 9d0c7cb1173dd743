"""Training on CPU keeps freed host memory: after the first steps, a step's blocks fault no pages
(megatron_llm/training/host_memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Page faults of each of ten steps that allocate, fill and free `sizes` MiB. Four 16 MiB blocks are a step's
# expert gradients (configs/mixtral_tiny.yaml), which glibc's own settings map anew at some steps and not at
# others; one 64 MiB block is above the 32 MiB its adjusting mmap threshold can reach, mapped anew every step.
STEPS = """
import resource, sys, torch
from megatron_llm.training.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(size << 18).fill_(1.0) for size in map(int, sys.argv[2:])]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # of 64 MiB


def steps(mode: str, sizes: list[int], **env: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode, *map(str, sizes)], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    kept, *faults = out.stdout.split()
    return kept, [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_host_memory_is_reused_without_page_faults():
    # The first steps grow the heap, as a training run's first steps do; then the freed blocks are reused.
    kept, faults = steps("keep", [16] * 4)
    assert kept == "True" and max(faults[-3:]) < PAGES // 10, faults
    # glibc's own settings: the 64 MiB block faults every step...
    assert min(steps("system", [64])[1]) > PAGES * 0.9
    # ... and so it does where the user set glibc's malloc: theirs stand.
    kept, faults = steps("keep", [64], GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert kept == "False" and min(faults) > PAGES * 0.9, faults


def test_training_on_cpu_sets_it(tiny_config, monkeypatch):
    from megatron_llm.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_host_memory", lambda: calls.append("kept"))
    trainer.train(tiny_config(training__steps=1, training__eval_interval=0, checkpoint__interval=0))
    assert calls == ["kept"]
