#!/usr/bin/env python
"""Train a LLaMA-style decoder.

One process (CPU or one GPU):   python train.py --config configs/tiny.yaml
One node, 8 GPUs:               torchrun --nproc_per_node 8 train.py --config configs/llama3_8b.yaml
Any key can be overridden:      python train.py --config configs/tiny.yaml --training.steps 50
Every key, type and default:    python train.py --help
Launchers (multi-node, Slurm):  launch/torchrun.sh, launch/slurm.sbatch

Exit status: 0 trained to training.steps; 2 bad config or data (one line on stderr); 1 a crash or a hung
rank; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint: run it again to continue.
"""

import sys

from megatron_llm.config import parse_args
from megatron_llm.errors import UsageError


def main(argv: list[str]) -> int:
    try:
        config = parse_args(argv)
        from megatron_llm.training.faults import REQUEUE_EXIT_CODE
        from megatron_llm.training.trainer import train  # after parsing: --help and bad flags stay instant

        result = train(config)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return REQUEUE_EXIT_CODE if result.stopped else 0  # stopped by SIGTERM/SIGUSR1 after a checkpoint


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
