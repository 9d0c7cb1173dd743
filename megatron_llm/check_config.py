"""Check a training config and its layout for a world size, as every rank of train.py would, starting nothing.

    python -m megatron_llm.check_config --world-size 8 configs/llama3_8b.yaml --parallel.tp 2

launch/torchrun.sh runs it once before it starts the workers: a bad config or layout, a dataset, tokenizer
or checkpoint to resume that is not there, or a dataset whose .idx does not describe its .bin, then prints one
line and exits 2, instead of one line per rank followed by torchrun's ChildFailedError traceback.
Exit status: 0 when train.py would start, 2 with `error: ...` on stderr when it would refuse.
"""

from __future__ import annotations

import sys

from megatron_llm.config import Config, load_config
from megatron_llm.errors import ArgumentParser, UsageError


def check(config: str, overrides: list[str], world_size: int) -> None:
    """Raises UsageError where train.py would, before its process group: config, layout, device."""
    from megatron_llm.parallel.dims import check_layout, pick_device  # torch: after the cheap checks

    cfg = load_config(config, overrides)
    check_layout(cfg.parallel, world_size)
    pick_device(cfg.training.device)
    check_inputs(cfg)


# A .bin up to this size has its token ids checked against the vocabulary before the run starts (a second or
# so); a larger one only when the datasets are built, after checkpoint.dir is locked: reading every token of a
# big corpus would delay every start, and the .idx records no maximum id to read instead.
SCAN_TOKENS_UP_TO = 64 * 2**20


def check_inputs(cfg: Config) -> None:
    """The files the run reads are on this node and sound: its datasets (the .idx against its .bin, and the token
    ids of a small .bin against the vocabulary), tokenizer and the checkpoint it resumes. The ranks read them only
    inside their process group, after the writing rank has locked checkpoint.dir, where each prints its own
    refusal and torchrun a traceback."""
    from megatron_llm.checkpoint.native import resolve_checkpoint
    from megatron_llm.data.datasets import check_indexed_dataset
    from megatron_llm.data.preprocess import MASK_SUFFIX
    from megatron_llm.data.tokenizer import load_tokenizer

    load_tokenizer(cfg.data.tokenizer)
    if not cfg.data.default_corpus:  # else the first run builds them
        masks = {MASK_SUFFIX: 2} if cfg.data.format == "sft" else {}  # a loss mask holds 0 and 1
        for spec in cfg.data.blend:
            for suffix, vocab_size in {"": cfg.model.vocab_size, **masks}.items():
                head_rows = None if suffix else cfg.model.output_vocab_size  # the labels a pruned head predicts
                check_indexed_dataset(f"{spec.path}{suffix}", vocab_size, scan_up_to=SCAN_TOKENS_UP_TO, head_rows=head_rows)
    if cfg.checkpoint.resume not in (None, "auto"):
        resolve_checkpoint(cfg.checkpoint.resume)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m megatron_llm.check_config", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="ranks the launcher will start")
    parser.add_argument("config", help="the training YAML file")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.world_size < 1:
            raise UsageError(f"--world-size must be positive, got {args.world_size}")
        check(args.config, overrides, args.world_size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
