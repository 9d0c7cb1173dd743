#!/usr/bin/env python
"""Loss and perplexity of a checkpoint, overall and per channel, on the validation split of a blend.

    python tools/evaluate.py --checkpoint checkpoints/tiny --data '[{path: data/stdlib/text}, {path: data/stdlib/networking}]'
    python tools/evaluate.py --checkpoint hf/Llama-3.2-1B --data '[{path: data/web, name: web}]' \\
        --tokenizer hf/Llama-3.2-1B --seq-len 2048 --batches 20 --tensorboard runs/eval

The checkpoint may be in any format megatron_llm.load_model reads (native, Hugging Face, Megatron-LM).
--data is a data.blend list; each dataset is a channel, evaluated on its own validation split (data.split),
and the overall loss is the token-weighted mean over the same tokens, exactly as training computes
val_loss and val_loss/<channel>. A native checkpoint's own config supplies the defaults (sequence length,
split, seed, micro-batch, evaluation batches), so its numbers are those training logged. One process,
fp32 on CPU: a model that fits in this machine's memory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.config import DataConfig, config_from_dict  # noqa: E402
from megatron_llm.errors import UsageError  # noqa: E402
from megatron_llm.training.evaluation import ChannelSums, mean_loss, perplexity  # noqa: E402


def saved_config(path: str, fmt: str) -> tuple[dict, int]:
    """(the training config a native checkpoint was saved with, its step); ({}, 0) for other formats."""
    if fmt != "native":
        return {}, 0
    from megatron_llm.checkpoint.native import read_config, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    match = re.search(r"step_(\d+)$", step_dir.name)
    return read_config(step_dir), int(match.group(1)) if match else 0


def settings(args: argparse.Namespace, saved: dict) -> tuple[DataConfig, int, int, int]:
    """(data config, seed, micro-batch size, batches per channel): the flags over the checkpoint's config."""
    data, training = saved.get("data", {}), saved.get("training", {})
    try:
        blend = yaml.safe_load(args.data)
    except yaml.YAMLError:
        raise UsageError(f"--data {args.data!r} is not a YAML list like '[{{path: data/web}}]'") from None
    values = {
        "blend": blend,
        "seq_len": args.seq_len or data.get("seq_len", 128),
        "split": args.split or data.get("split", "98,2,0"),
        "tokenizer": args.tokenizer or data.get("tokenizer", "byte"),
    }
    cfg = config_from_dict({"data": values}).data  # the same type checks as train.py's
    if not cfg.blend:
        raise UsageError("--data is empty: list at least one {path, name} dataset")
    micro = args.micro_batch_size or training.get("micro_batch_size", 8)
    batches = args.batches or training.get("eval_iters", 40)
    return cfg, training.get("seed", 1234), micro, batches


def evaluate_checkpoint(args: argparse.Namespace) -> tuple[ChannelSums, int, str]:
    """(per-channel sums, the checkpoint's step, a description of the run) in one process."""
    import torch
    import torch.distributed as dist

    from megatron_llm.checkpoint.convert import detect_format, load_model
    from megatron_llm.data.datasets import build_datasets
    from megatron_llm.parallel import ParallelDims
    from megatron_llm.training.evaluation import channel_sums

    fmt = detect_format(args.checkpoint)
    saved, step = saved_config(args.checkpoint, fmt)
    data, seed, micro, batches = settings(args, saved)
    model = load_model(args.checkpoint)
    if data.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {data.seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    # megatron-core builds its datasets only inside a process group: one process, in memory.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        datasets = build_datasets(data, model.cfg.vocab_size, seed, num_train_samples=1, num_valid_samples=batches * micro)
        if not datasets.valid_by_channel:
            raise UsageError(f"data.split {data.split!r} gives the validation split no documents; pass --split")
        single = ParallelDims(world_size=1, rank=0, tp=1, pp=1, dp=1)
        with torch.no_grad():
            sums = channel_sums(model, datasets.valid_by_channel, micro, batches, single, autocast=None)
    finally:
        dist.destroy_process_group()
    about = (f"{args.checkpoint} ({fmt}{f', step {step}' if step else ''}): validation split ({data.split}) of "
             f"{len(sums)} dataset(s), {batches} x {micro} sequences x {data.seq_len} tokens each")
    return sums, step, about


def table(sums: ChannelSums) -> str:
    rows = [(name, tokens, loss / tokens) for name, (loss, tokens) in sums.items()]
    rows.append(("all", sum(t for _, t, _ in rows), mean_loss(sums)))
    width = max(len("channel"), *(len(name) for name, _, _ in rows))
    lines = [f"{'channel':<{width}} {'tokens':>10} {'loss':>8} {'perplexity':>11}"]
    lines += [f"{name:<{width}} {tokens:>10,.0f} {loss:>8.4f} {perplexity(loss):>11.3f}" for name, tokens, loss in rows]
    return "\n".join(lines)


def write_tensorboard(logdir: str, sums: ChannelSums, step: int) -> None:
    """eval_loss and eval_perplexity, overall and /<channel>, at the checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_llm.training.channels import tag_safe

    losses = {"": mean_loss(sums), **{f"/{tag_safe(name)}": loss / tokens for name, (loss, tokens) in sums.items()}}
    with SummaryWriter(log_dir=logdir) as writer:
        for suffix, loss in losses.items():
            writer.add_scalar(f"eval_loss{suffix}", loss, step)
            writer.add_scalar(f"eval_perplexity{suffix}", perplexity(loss), step)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native, Hugging Face or Megatron-LM checkpoint directory")
    p.add_argument("--data", required=True, help="a data.blend list: '[{path: PREFIX, name: CHANNEL}, ...]'")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the checkpoint's data.seq_len, else 128)")
    p.add_argument("--split", help="train,valid,test document weights (default: the checkpoint's data.split, else 98,2,0)")
    p.add_argument("--tokenizer", help="'byte' or a tokenizer.json, for the vocabulary check (default: the checkpoint's)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward (default: the checkpoint's, else 8)")
    p.add_argument("--batches", type=int, help="micro-batches per channel (default: the checkpoint's eval_iters, else 40)")
    p.add_argument("--tensorboard", help="also write eval_loss[/<channel>] and eval_perplexity to this directory")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        for flag in ("seq_len", "micro_batch_size", "batches"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
        sums, step, about = evaluate_checkpoint(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(about)
    print(table(sums))
    if args.tensorboard:
        write_tensorboard(args.tensorboard, sums, step)
        print(f"wrote eval_loss and eval_perplexity at step {step} to {args.tensorboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
