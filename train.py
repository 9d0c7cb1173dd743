#!/usr/bin/env python
"""Train a LLaMA-style decoder.

One process (CPU or one GPU):   python train.py --config configs/tiny.yaml
One node, 8 GPUs:               torchrun --nproc_per_node 8 train.py --config configs/llama3_8b.yaml
Any key can be overridden:      python train.py --config configs/tiny.yaml --training.steps 50
Every key, type and default:    python train.py --help
Launchers (multi-node, Slurm):  launch/torchrun.sh, launch/slurm.sbatch

Exit status: 0 trained to training.steps; 2 bad config or data (one line on stderr); 1 a crash or a hung
rank; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (or during start-up, before there was
anything to save): run it again with --checkpoint.resume auto to continue.
"""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    # Imported here, not at the top: the requeue handlers below are in place before any import.
    from megatron_llm.check_config import check_inputs
    from megatron_llm.config import parse_args
    from megatron_llm.errors import UsageError

    try:
        config = parse_args(argv)
        check_inputs(config)  # before the run directory is locked and the process group formed
        from megatron_llm.training.faults import REQUEUE_EXIT_CODE
        from megatron_llm.training.trainer import train  # after parsing: --help and bad flags stay instant

        result = train(config)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return REQUEUE_EXIT_CODE if result.stopped else 0  # stopped by SIGTERM/SIGUSR1 after a checkpoint


def requeue_on_stop_signals() -> None:
    """Until train() records stop signals itself (after imports that take seconds), SIGTERM or SIGUSR1
    ends the process with the requeue status, as during training, instead of 143: nothing has been
    trained yet that a checkpoint could keep, and Slurm requeues only on 75."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: sys.exit(os.EX_TEMPFAIL))


if __name__ == "__main__":
    requeue_on_stop_signals()
    sys.exit(main(sys.argv[1:]))
