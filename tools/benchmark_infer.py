"""Batch inference speed in one run: continuous against static batching, and Infer with 2 workers against 1.

    python tools/benchmark_infer.py --config configs/tiny.yaml --model checkpoints/tiny --prompts 48

A trained checkpoint (or the config's model with random weights), prompts of mixed lengths cut from the
standard library's source, greedy decoding where each row stops at --stop (a newline: a trained model's
lines end at different lengths) or at --max-new-tokens. Static batching decodes
fixed groups of --batch-size prompts, each group until its longest row ends; continuous batching gives a
finished row's slot to the next prompt at once. Both produce the same tokens (checked). Then Infer runs
the same prompts with 1 and with 2 worker processes (each worker 1/2 of the cores). Seconds and ratios
are printed side by side.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.checkpoint.native import save_weights  # noqa: E402
from megatron_llm.config import load_config  # noqa: E402
from megatron_llm.inference.infer import Generation, Infer  # noqa: E402
from megatron_llm.inference.llm import LLM  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--model", default=None, help="a trained checkpoint (byte tokenizer); default: random weights")
    p.add_argument("--stop", default="\n", help="stop string: a trained model's rows end at different lengths")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    corpus = "".join(path.read_text() for path in sorted(Path(json.__file__).parent.glob("*.py")))  # stdlib text
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(corpus) - 64, (args.prompts,), generator=gen).tolist()
    lengths = torch.randint(4, 40, (args.prompts,), generator=gen).tolist()
    prompts = [corpus[a : a + n] for a, n in zip(starts, lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model
        if ckpt is None:
            from megatron_llm.model import build_model

            ckpt = str(Path(tmp) / "model")
            save_weights(Path(ckpt), build_model(cfg.model, "cpu", seed=0).state_dict(), cfg.to_dict())
        llm = LLM.load(ckpt, tokenizer="byte")
        options = dict(max_new_tokens=args.max_new_tokens, stop=[args.stop])

        start = time.perf_counter()
        static = []
        for i in range(0, len(prompts), args.batch_size):
            static += llm.generate(prompts[i : i + args.batch_size], **options)
        t_static = time.perf_counter() - start
        start = time.perf_counter()
        continuous = dict(llm.batched(enumerate(prompts), batch_size=args.batch_size, **options))
        t_continuous = time.perf_counter() - start
        same = [llm.decode(continuous[i]) for i in range(len(prompts))] == static
        lengths = sorted(len(continuous[i]) for i in range(len(prompts)))

        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
        generation = Generation(max_new_tokens=args.max_new_tokens, stop=[args.stop])
        times = {}
        for workers in (1, 2):
            start = time.perf_counter()
            Infer(ckpt, str(data), str(Path(tmp) / f"out{workers}.jsonl"), num_workers=workers,
                  batch_size=args.batch_size, generation=generation, tokenizer="byte").run()
            times[workers] = time.perf_counter() - start
        outputs = [(Path(tmp) / f"out{w}.jsonl").read_text() for w in (1, 2)]

    print(f"{args.prompts} prompts of 4-39 bytes of Python source, up to {args.max_new_tokens} new tokens (median {lengths[len(lengths) // 2]}, "
          f"range {lengths[0]}-{lengths[-1]}), batch {args.batch_size}, greedy, CPU fp32")
    print(f"static batching      {t_static:7.2f} s")
    print(f"continuous batching  {t_continuous:7.2f} s   ratio {t_static / t_continuous:.2f}x   same tokens: {same}")
    print(f"Infer, 1 worker      {times[1]:7.2f} s   (process start and model load included)")
    print(f"Infer, 2 workers     {times[2]:7.2f} s   ratio {times[1] / times[2]:.2f}x   same output: {outputs[0] == outputs[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
