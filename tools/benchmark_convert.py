#!/usr/bin/env python
"""Conversion speed and memory on a ~1B-parameter random model, against simply copying the same bytes.

    python tools/benchmark_convert.py                       # Llama-3.2-1B shape, bf16, in a temp dir
    python tools/benchmark_convert.py --workdir /data/bench --keep --tp 2 --pp 2

Writes a random Hugging Face checkpoint (not timed), copies its files byte for byte (the baseline; and
once more through user space, mmap then write, the least any converter moves), then converts hf -> megatron(tp, pp) -> hf, each conversion in a fresh process so that its peak RSS
(ru_maxrss, which counts memory-mapped file pages it touched as well as allocations) is its own. Every
step reads what the step before wrote, from the page cache when memory allows, as the copy does.
Targets: each conversion under 2x the copy time, peak RSS under 1.5x the model's bytes.
"""

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.checkpoint.convert import Options, convert  # noqa: E402
from megatron_llm.checkpoint.hf import export_hf_config  # noqa: E402
from megatron_llm.checkpoint.hf_io import HFWriter  # noqa: E402
from megatron_llm.checkpoint.stream import directory_bytes, native_shapes, stream  # noqa: E402
from megatron_llm.config import ModelConfig  # noqa: E402
from megatron_llm.errors import ArgumentParser  # noqa: E402

# Llama-3.2-1B's shape: 1.24B parameters, tied embeddings, GQA 32/8.
LLAMA_1B = ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                       ffn_hidden_size=8192, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True)


class RandomReader:
    """A source of N(0, 0.02) tensors of the model's shapes, one group at a time."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, directory: Path):
        self.config, self.dtype, self.directory = cfg, dtype, directory
        self.hf_config = export_hf_config(cfg, str(dtype).removeprefix("torch."))
        self.generator = torch.Generator().manual_seed(0)
        self.shapes = native_shapes(cfg)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: (torch.randn(self.shapes[n], generator=self.generator) * 0.02).to(self.dtype) for n in names}


def make_input(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> None:
    writer = HFWriter(path, cfg, dtype, None, None, max_shard_bytes=5 * 1024**3)
    stream(RandomReader(cfg, dtype, path), writer, dtype, "random model")
    writer.finish()


def copy_seconds(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def user_space_copy_seconds(src: Path, dst: Path) -> float:
    """The same bytes read through a memory map and written with write(), as any converter must move
    them: a floor for user-space tools (the plain copy above stays inside the kernel)."""
    dst.mkdir()
    start = time.perf_counter()
    for file in sorted(src.iterdir()):
        with open(file, "rb") as f, open(dst / file.name, "wb") as g:
            if file.stat().st_size:
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                    view = memoryview(m)
                    for offset in range(0, len(m), 64 << 20):
                        g.write(view[offset : offset + (64 << 20)])
                    view.release()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def child(argv: list[str]) -> None:
    """One conversion in this process; prints seconds and peak RSS as JSON."""
    src, src_fmt, dst, dst_fmt, tp, pp = argv
    start = time.perf_counter()
    convert(src, src_fmt, dst, dst_fmt, Options(tp=int(tp), pp=int(pp)))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's high-water RSS in bytes. VmHWM, not ru_maxrss: the latter survives fork and exec,
    so a child would report its parent's size if that was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB there too on most systems


def timed_conversion(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what a conversion imports (torch, megatron-core's allow-list)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import benchmark_convert as b, megatron_llm.checkpoint.megatron_io as m; "
            "m._allowed_globals(False); print(b.peak_rss())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the checkpoints go: hf/, megatron/, hf-back/ (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (the random input is reused if present)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, mg, back = work / "hf", work / "megatron", work / "hf-back"  # only these are created and removed
    try:
        if not (hf / "config.json").exists():
            print(f"writing a random {LLAMA_1B.num_params() / 1e9:.2f}B-parameter model to {hf} ...", flush=True)
            make_input(hf, LLAMA_1B, dtype)
        model_bytes = LLAMA_1B.num_params() * dtype.itemsize
        for stale in (mg, back):
            shutil.rmtree(stale, ignore_errors=True)
        os.sync()  # each step starts with no dirty pages of the last one still being written back
        copy = copy_seconds(hf, work / "copy")
        os.sync()
        user_copy = user_space_copy_seconds(hf, work / "copy")
        base = baseline_rss()
        os.sync()
        there = timed_conversion(hf, "hf", mg, "megatron", args.tp, args.pp)
        os.sync()
        again = timed_conversion(mg, "megatron", back, "hf", 1, 1)
        print(f"\nmodel: {LLAMA_1B.num_params() / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB in {args.dtype}; "
              f"on disk {directory_bytes(hf) / 1e9:.2f} GB")
        print(f"plain copy of the same files: {copy:.2f} s; through user space (mmap -> write): {user_copy:.2f} s")
        print(f"a process that imports torch and megatron-core: {base / 1e9:.2f} GB RSS")
        print(f"{'step':34} {'seconds':>8} {'x copy':>7} {'x user copy':>12} {'peak RSS GB':>12} {'x model':>8}")
        for name, r in ((f"hf -> megatron (tp={args.tp}, pp={args.pp})", there), ("megatron -> hf", again)):
            print(f"{name:34} {r['seconds']:8.2f} {r['seconds'] / copy:7.2f} {r['seconds'] / user_copy:12.2f} "
                  f"{r['peak_rss'] / 1e9:12.2f} {r['peak_rss'] / model_bytes:8.2f}")
    finally:
        if not args.keep:
            for path in (hf, mg, back, work / "copy"):
                shutil.rmtree(path, ignore_errors=True)
            if not args.workdir:
                work.rmdir()


if __name__ == "__main__":
    main()
