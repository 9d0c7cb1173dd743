"""Generate for every prompt of a jsonl file with several model replicas (see megatron_llm/inference/infer.py).

    python tools/infer.py --model checkpoints/tiny --data prompts.jsonl --output results.jsonl --num-workers 2
    python tools/infer.py --model hf/Llama-3.2-1B --data p.jsonl --output r.jsonl --num-workers 2 \\
        --devices cuda:0 cuda:1 cuda:2 cuda:3 --dtype bf16            # 2 workers of 2 GPUs each
    torchrun --nnodes 2 --nproc_per_node 1 ... tools/infer.py ...      # several nodes: one merged output
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.inference.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
