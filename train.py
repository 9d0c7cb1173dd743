#!/usr/bin/env python
"""Train a LLaMA-style decoder.

One process (CPU or one GPU):   python train.py --config configs/tiny.yaml
One node, 8 GPUs:               torchrun --nproc_per_node 8 train.py --config configs/llama3_8b.yaml
Any key can be overridden:      python train.py --config configs/tiny.yaml --training.steps 50
Every key, type and default:    python train.py --help
"""

import sys

from megatron_llm.config import parse_args
from megatron_llm.errors import UsageError


def main(argv: list[str]) -> int:
    try:
        config = parse_args(argv)
        from megatron_llm.training.trainer import train  # after parsing: --help and bad flags stay instant

        train(config)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
