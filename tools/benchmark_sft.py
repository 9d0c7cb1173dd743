"""SFT speed and packing: packed conversations with document masks against pretraining batches of the same shape.

    python tools/benchmark_sft.py --config configs/tiny.yaml
    python tools/benchmark_sft.py --config configs/llama_100m.yaml --data.seq_len 1024 --steps 6 --device cuda

Builds the project's synthetic conversation set (megatron_llm/data/synthetic_chat.py: four kinds, a few
tokens to a few hundred) with the byte tokenizer into a temporary directory, packs it best-fit as
data.format sft does and prints the packing efficiency (real tokens / slots) there and on a wide
mixed-length set (uniform lengths from 1% to 90% of the sequence). Then one model alternates
training steps between the packed SFT micro-batches (loss mask, per-token channels, positions restarting
per conversation, the document mask: FlexAttention block masks on CUDA; on CPU each document attended
on its own, model/attention_kernels.attend_by_document) and
random pretraining micro-batches of the same training.micro_batch_size x data.seq_len (plain causal
attention), and prints both speeds in slot tokens/s and their paired ratio: the cost of the masking.
"""

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import SINGLE, Runner, alternate  # noqa: E402
from megatron_llm.config import DatasetSpec, load_config  # noqa: E402
from megatron_llm.data.loader import collate  # noqa: E402
from megatron_llm.data.packing import best_fit, build_conversation_datasets  # noqa: E402
from megatron_llm.data.preprocess import preprocess  # noqa: E402
from megatron_llm.data.synthetic import random_batches  # noqa: E402
from megatron_llm.data.synthetic_chat import KINDS, conversations  # noqa: E402
from megatron_llm.data.tokenizer import ByteTokenizer  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.model import build_model  # noqa: E402
from megatron_llm.parallel.dims import pick_device  # noqa: E402
from megatron_llm.training.optimizer import build_optimizer  # noqa: E402
from megatron_llm.training.step import autocast_dtype, train_step  # noqa: E402


def sft_batches(cfg, directory: Path, conversations_n: int) -> tuple[list[dict], str]:
    """The run's micro-batches of packed conversations, and the packing note data.format sft prints."""
    records = conversations(conversations_n, seed=cfg.training.seed)
    for kind in KINDS:
        src = directory / f"{kind}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records if r["channel"] == kind))
        preprocess(str(src), str(directory / kind), fmt="chat", progress=False)
    cfg.data.blend = [DatasetSpec(path=str(directory / kind)) for kind in KINDS]
    cfg.data.format, cfg.data.split = "sft", "100,0,0"
    t = cfg.training
    count = t.micro_batch_size * t.grad_accum_steps
    train, _, note = build_conversation_datasets(cfg.data, cfg.model.vocab_size, t.seed, count, ByteTokenizer.eod)
    rows = [train[i] for i in range(count)]
    return [collate(rows[m * t.micro_batch_size : (m + 1) * t.micro_batch_size]) for m in range(t.grad_accum_steps)], note


def mixed_length_efficiency(seq_len: int, n: int = 20000, seed: int = 0) -> float:
    lengths = np.random.default_rng(seed).integers(max(seq_len // 100, 1), int(0.9 * seq_len), size=n)
    bins = best_fit(lengths, seq_len)
    return float(lengths.sum() / (len(bins) * seq_len))


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=4000, help="synthetic conversations to pack")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a loaded machine")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size < ByteTokenizer.vocab_size:
            raise UsageError(f"the conversations are byte-tokenized: model.vocab_size must be at least {ByteTokenizer.vocab_size}")
        device = pick_device(cfg.training.device)
        with tempfile.TemporaryDirectory() as directory:
            sft, note = sft_batches(cfg, Path(directory), args.conversations)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(note)
    print(f"packing efficiency on {20000} uniform lengths of 1-90% of {cfg.data.seq_len}: "
          f"{mixed_length_efficiency(cfg.data.seq_len):.2%}")
    sft = [{k: v.to(device) for k, v in mb.items()} for mb in sft]
    plain = random_batches(cfg, device, cfg.training.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(cfg.model, device, seed=cfg.training.seed)
    optimizer = build_optimizer(model, cfg.optimizer)
    autocast = autocast_dtype(cfg.training.dtype, device)

    def runner(batches: list[dict], channels: int) -> Runner:
        def step():
            out = train_step(model, optimizer, batches, SINGLE, z_loss=0.0, grad_clip=cfg.optimizer.grad_clip,
                             autocast=autocast, num_channels=channels)
            return out.loss, out.grad_norm
        return Runner(step)

    packed, pretraining = runner(sft, len(KINDS)), runner(plain, 1)
    alternate(packed, pretraining, args.warmup, device, record=False)
    load = os.getloadavg()[0]
    alternate(packed, pretraining, args.steps, device, record=True)
    t = cfg.training
    slots = t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len
    for name, r in (("sft packed + document mask", packed), ("pretraining, plain causal", pretraining)):
        print(f"{name:28s} {slots / statistics.median(r.seconds):10,.0f} tokens/s  {1000 * statistics.median(r.seconds):8.1f} ms/step")
    ratios = sorted(a / b for a, b in zip(packed.seconds, pretraining.seconds))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f"step time sft / pretraining: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}) "
          f"on {device.type}, {t.micro_batch_size} x {cfg.data.seq_len} tokens per micro-batch")
    print(f"{torch.get_num_threads()} CPU threads; load average {load:.1f} at the start of the timed steps, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
