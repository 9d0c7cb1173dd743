"""Decoding speed of megatron_llm's generate against transformers' generate, same model and prompts, in one run.

    python tools/benchmark_generate.py --config configs/tiny.yaml
    python tools/benchmark_generate.py --config configs/llama_100m.yaml --new-tokens 32 --repeats 5

Both sides get the same random weights (ours, copied into transformers' Llama through the family table), the
same prompts (random token ids of --prompt-len) and greedy decoding of exactly --new-tokens tokens (no stop
token), at batch 1 and --batch. Runs alternate between the two sides; medians are reported. Printed per side:
prefill latency (the prompt's forward), per-token decode latency, decode tokens/s, and the ratio, both of the
medians and as the median of each repeat's own ratio. The outputs are checked to be the same tokens (fp32), so
both sides did the same work.

--clock cpu times each side by this thread's CPU seconds instead of the wall clock: on a shared machine whose
other jobs hold the cores, waiting for a core is not the side's work (both sides run one thread). Memory
and cache contention from those jobs still show in either clock.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.checkpoint.hf import hf_config_from_model_config, native_to_hf  # noqa: E402
from megatron_llm.config import load_config  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.inference.generate import Sampling, generate_ids  # noqa: E402
from megatron_llm.model import build_model  # noqa: E402


def hf_model(model):
    import transformers

    config = transformers.LlamaConfig(**hf_config_from_model_config(model.cfg, "llama"), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(native_to_hf(model.state_dict(), model.cfg, "llama"))
    hf.generation_config.eos_token_id = None  # ours has no stop token here; min_new_tokens would ban its id 2
    return hf


def timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def side_times(generate, prompts: torch.Tensor, new_tokens: int, clock) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token): a 1-token run is the prefill plus one pick."""
    prefill = timed(lambda: generate(prompts, 1), clock)
    total = timed(lambda: generate(prompts, new_tokens), clock)
    return prefill, (total - prefill) / (new_tokens - 1)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a training YAML file: its model is used")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (batch 1 is always run)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side and batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1: steadier on a shared "
                        "machine, where spinning OpenMP threads of 2 wait on a busy core)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall seconds, or this thread's CPU seconds (steadier on a loaded machine; one thread only)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.prompt_len + args.new_tokens > cfg.model.max_seq_len or args.new_tokens < 2:
            raise UsageError("--prompt-len + --new-tokens must fit model.max_seq_len, and --new-tokens be >= 2")
        if args.clock == "cpu" and args.threads != 1:
            raise UsageError("--clock cpu counts this thread's seconds only: use it with --threads 1")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", seed=0).eval()
    hf = hf_model(model)

    def ours(prompts, n):
        return generate_ids(model, prompts.tolist(), Sampling(max_new_tokens=n))

    def theirs(prompts, n):
        with torch.no_grad():
            # an explicit mask: without one transformers takes every id equal to pad_token_id in a prompt for padding
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, cpu fp32, {torch.get_num_threads()} threads, {args.clock} clock; model {cfg.model.num_params() / 1e6:.1f}M "
          f"params; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; medians of {args.repeats}")
    print(f"{'batch':>5} {'side':>6} {'prefill ms':>11} {'ms/token':>9} {'tokens/s':>9}")
    for batch in (1, args.batch):
        prompts = torch.randint(0, cfg.model.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        if ours(prompts, 8) != theirs(prompts, 8):
            print("warning: the two sides decoded different tokens", file=sys.stderr)
        runs = {"ours": [], "HF": []}
        for _ in range(args.repeats):
            runs["ours"].append(side_times(ours, prompts, args.new_tokens, clock))
            runs["HF"].append(side_times(theirs, prompts, args.new_tokens, clock))
        rates = {}
        for side, values in runs.items():
            prefill = statistics.median(v[0] for v in values)
            per_token = statistics.median(v[1] for v in values)
            rates[side] = batch / per_token
            print(f"{batch:>5} {side:>6} {prefill * 1e3:>11.1f} {per_token * 1e3:>9.2f} {rates[side]:>9.0f}")
        # each repeat's two runs are neighbours in time, so their ratio cancels load that drifts between repeats
        paired = statistics.median(theirs_[1] / ours_[1] for ours_, theirs_ in zip(runs["ours"], runs["HF"]))
        print(f"{batch:>5}  ratio ours/HF decode tokens/s: {rates['ours'] / rates['HF']:.2f} (of medians), "
              f"{paired:.2f} (median of paired runs)")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
