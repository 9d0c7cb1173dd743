"""Training on CPU keeps freed host memory: a step's second allocation of a block faults no pages
(megatron_llm/training/host_memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Faults of allocating, filling and freeing 64 MiB, the second time (the first grows the heap): the size of a
# large weight's gradient, above the 32 MiB that glibc's adjusting mmap threshold can reach.
STEP = """
import resource, sys, torch
from megatron_llm.training.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(kept, faults())
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def second_step(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", STEP, mode], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_host_memory_is_reused_without_page_faults():
    kept, faults = second_step("keep")
    assert kept == "True" and faults < PAGES // 10
    # glibc's defaults map the block anew, every page faulting again: what the setting removes.
    assert second_step("system")[1] > PAGES * 0.9
    # A user's own malloc settings stand.
    kept, faults = second_step("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert kept == "False" and faults > PAGES * 0.9
