#!/usr/bin/env python
"""Loss and perplexity of a checkpoint, overall and per channel, on the validation split of a blend; for a
reward model (a score head), its pairwise loss, accuracy and margin on preference pairs.

    python tools/evaluate.py --checkpoint checkpoints/tiny --data '[{path: data/stdlib/text}, {path: data/stdlib/networking}]'
    python tools/evaluate.py --checkpoint hf/Llama-3.2-1B --data '[{path: data/web, name: web}]' \\
        --tokenizer hf/Llama-3.2-1B --seq-len 2048 --batches 20 --tensorboard runs/eval
    python tools/evaluate.py --checkpoint checkpoints/reward --data '[{path: data/post/pairs_echo, name: echo}]'

The checkpoint may be in any format megatron_llm.load_model reads (native, Hugging Face, Megatron-LM).
--data is a data.blend list; each dataset is a channel, evaluated on its own validation split (data.split),
and the overall loss is the token-weighted mean over the same tokens, exactly as training computes
val_loss and val_loss/<channel>. The data format is the checkpoint's (--format): pretraining documents,
sft conversations (the loss on their masked-in tokens) or, for a score head, pairs written by
tools/preprocess_data.py --format pairs (the Bradley-Terry loss per pair with the run's margin and
centering, accuracy r_chosen > r_rejected and margin r_chosen - r_rejected). A native checkpoint's own
config supplies the defaults (format, sequence length, split, seed, micro-batch, evaluation batches, reward
margin and centering), so its numbers are those training logged. One process, fp32 on CPU: a model that
fits in this machine's memory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.config import DataConfig, check_split, config_from_dict  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.paths import writable_directory  # noqa: E402
from megatron_llm.training.channels import tag_safe  # noqa: E402
from megatron_llm.training.evaluation import ChannelSums, PairRates, mean_loss, perplexity, rate_scalars  # noqa: E402


def saved_config(path: str, fmt: str) -> tuple[dict, int]:
    """(the training config a native checkpoint was saved with, its step); ({}, 0) for other formats."""
    if fmt != "native":
        return {}, 0
    from megatron_llm.checkpoint.native import read_config, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    match = re.search(r"step_(\d+)$", step_dir.name)
    return read_config(step_dir), int(match.group(1)) if match else 0


def settings(args: argparse.Namespace, saved: dict, head: str) -> tuple[DataConfig, int, int, int]:
    """(data config, seed, micro-batch size, batches per channel): the flags over the checkpoint's config."""
    data, training = saved.get("data", {}), saved.get("training", {})
    fmt = args.format or ("pairs" if head == "score" else data.get("format", "pretrain"))
    if (fmt == "pairs") != (head == "score"):
        raise UsageError(f"--format {fmt} with a model whose head is {head!r}: preference pairs need a reward model "
                         "(model.head score) and a reward model scores pairs only; pass --format pairs or another checkpoint")
    try:
        blend = yaml.safe_load(args.data)
    except yaml.YAMLError:
        raise UsageError(f"--data {args.data!r} is not a YAML list like '[{{path: data/web}}]'") from None
    values = {
        "blend": blend,
        "seq_len": args.seq_len or data.get("seq_len", 128),
        "split": args.split or data.get("split", "98,2,0"),
        "tokenizer": args.tokenizer or data.get("tokenizer", "byte"),
        "format": fmt,
    }
    cfg = config_from_dict({"data": values}).data  # the same type checks as train.py's
    check_split(cfg.split, "--split")
    if not cfg.blend:
        raise UsageError("--data is empty: list at least one {path, name} dataset")
    micro = args.micro_batch_size or training.get("micro_batch_size", 8)
    if fmt == "pairs" and micro % 2:
        raise UsageError(f"--micro-batch-size {micro} splits a pair: preference pairs are two rows, use an even size")
    batches = args.batches or training.get("eval_iters", 40)
    return cfg, training.get("seed", 1234), micro, batches


def evaluate_checkpoint(args: argparse.Namespace) -> tuple[ChannelSums, PairRates, int, str]:
    """(per-channel sums, a reward model's accuracy and margin sums, the checkpoint's step, a description of
    the run) in one process."""
    import torch
    import torch.distributed as dist

    from megatron_llm.checkpoint.convert import checkpoint_model_config, detect_format, load_model
    from megatron_llm.data.datasets import build_datasets
    from megatron_llm.parallel import ParallelDims
    from megatron_llm.training.evaluation import channel_sums

    fmt = detect_format(args.checkpoint)
    saved, step = saved_config(args.checkpoint, fmt)
    data, seed, micro, batches = settings(args, saved, checkpoint_model_config(args.checkpoint).head)
    training = saved.get("training", {})
    reward = (training.get("reward_margin", 0.0), training.get("reward_centering", 0.0)) if data.format == "pairs" else None
    model = load_model(args.checkpoint)
    if data.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {data.seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    # megatron-core builds its datasets only inside a process group: one process, in memory.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        datasets = build_datasets(data, model.cfg.vocab_size, seed, num_train_samples=1, num_valid_samples=batches * micro,
                                  head_rows=model.cfg.output_vocab_size)
        if not datasets.valid_by_channel:
            raise UsageError(f"data.split {data.split!r} gives the validation split no documents; pass --split")
        single = ParallelDims(world_size=1, rank=0, tp=1, pp=1, dp=1)
        with torch.no_grad():
            sums, rates = channel_sums(model, datasets.valid_by_channel, micro, batches, single, None, reward)
    finally:
        dist.destroy_process_group()
    about = (f"{args.checkpoint} ({fmt}{f', step {step}' if step else ''}): validation split ({data.split}) of "
             f"{len(sums)} dataset(s), {data.format}, {batches} x {micro} sequences x {data.seq_len} tokens each")
    return sums, rates, step, about


def table(sums: ChannelSums, rates: PairRates) -> str:
    """Per channel and "all": tokens, loss and perplexity; for pairs: pairs, loss, accuracy and margin."""
    names = [*sums, "all"]
    count = {**{name: n for name, (_, n) in sums.items()}, "all": sum(n for _, n in sums.values())}
    columns = {"loss": {**{name: loss / n for name, (loss, n) in sums.items()}, "all": mean_loss(sums)}}
    for key, by_channel in rates.items():  # pair-weighted over the channels, as training logs them
        columns[key] = {name: v / n for name, (v, n) in by_channel.items()} | {"all": mean_loss(by_channel)}
    if not rates:
        columns["perplexity"] = {name: perplexity(loss) for name, loss in columns["loss"].items()}
    width = max(len("channel"), *(len(name) for name in names))
    lines = [f"{'channel':<{width}} {'pairs' if rates else 'tokens':>10}" + "".join(f" {c:>11}" for c in columns)]
    lines += [f"{name:<{width}} {count[name]:>10,.0f}" + "".join(f" {col[name]:>11.4f}" for col in columns.values())
              for name in names]
    return "\n".join(lines)


def write_tensorboard(logdir: str, sums: ChannelSums, rates: PairRates, step: int) -> None:
    """eval_loss and eval_perplexity (or, for pairs, eval_accuracy and eval_margin), overall and
    /<channel>, at the checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    losses = {"": mean_loss(sums), **{f"/{tag_safe(name)}": loss / tokens for name, (loss, tokens) in sums.items()}}
    with SummaryWriter(log_dir=logdir) as writer:
        for suffix, loss in losses.items():
            writer.add_scalar(f"eval_loss{suffix}", loss, step)
            if not rates:
                writer.add_scalar(f"eval_perplexity{suffix}", perplexity(loss), step)
        for tag, value in rate_scalars(rates, "eval_", per_channel=True).items():
            writer.add_scalar(tag, value, step)


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="native, Hugging Face or Megatron-LM checkpoint directory")
    p.add_argument("--data", required=True, help="a data.blend list: '[{path: PREFIX, name: CHANNEL}, ...]'")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the checkpoint's data.seq_len, else 128)")
    p.add_argument("--split", help="train,valid,test document weights (default: the checkpoint's data.split, else 98,2,0)")
    p.add_argument("--format", choices=["pretrain", "sft", "pairs"],
                   help="the data's format (default: the checkpoint's data.format; pairs for a score head)")
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
        if args.tensorboard:
            writable_directory(args.tensorboard, "--tensorboard")  # before the evaluation, not after it
        sums, rates, step, about = evaluate_checkpoint(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(about)
    print(table(sums, rates))
    if args.tensorboard:
        write_tensorboard(args.tensorboard, sums, rates, step)
        print(f"wrote eval_loss and {'eval_accuracy, eval_margin' if rates else 'eval_perplexity'} at step {step} to {args.tensorboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
