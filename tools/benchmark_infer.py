"""Batch inference speed in one run: continuous against static batching, and Infer with 2 workers against 1.

    python tools/benchmark_infer.py --config configs/tiny.yaml --prompts 64 --min-new-tokens 4 --max-new-tokens 128

The workload is a server's: prompts of 4-39 bytes cut from the standard library's source, and each request's
own max_new_tokens drawn uniformly from --min-new-tokens..--max-new-tokens, so outputs have very different
lengths (greedy; --stop adds a stop string, for a trained --model). A trained checkpoint, or the config's
model with random weights. Static batching decodes fixed groups of --batch-size prompts, each group until its
longest row ends; continuous batching gives a finished row's slot to the next request at once. The two run
alternately --repeats times (medians); the rows whose tokens are the same on both paths are counted (with
random weights two logits can tie within float rounding, and the batch's shape then picks the winner).
Then tools/infer.py runs the same jsonl (each line its max_new_tokens) with 1 and with 2 worker processes
(each worker its share of the cores), alternated --repeats times, timed whole (the command as a user runs it:
Python's start, imports, the prompts' check, the workers' start and model load, generating, the merge) and
generating (from the first worker's model loaded to the last result, as the command reports it), and by the
busiest worker's CPU seconds generating: the generating time two otherwise idle cores would give, which other
jobs do not stretch. (With the kernel's autogroup scheduling, all the processes of one command share one CPU
share: while other sessions keep the cores busy, 2 workers get no more CPU than 1.) The machine's load
average is printed: timings on a shared machine move.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.checkpoint.native import save_weights  # noqa: E402
from megatron_llm.config import load_config  # noqa: E402
from megatron_llm.errors import ArgumentParser  # noqa: E402
from megatron_llm.inference.llm import LLM  # noqa: E402


def workload(count: int, low: int, high: int) -> tuple[list[str], list[int]]:
    """(prompts, each one's max_new_tokens), the same for every run."""
    corpus = "".join(path.read_text() for path in sorted(Path(json.__file__).parent.glob("*.py")))  # stdlib text
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(corpus) - 64, (count,), generator=gen).tolist()
    lengths = torch.randint(4, 40, (count,), generator=gen).tolist()
    limits = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    return [corpus[a : a + n] for a, n in zip(starts, lengths)], limits


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def infer_run(ckpt: str, data: Path, out: Path, workers: int, batch_size: int, stop) -> tuple[float, float, float, float]:
    """(seconds for the whole tools/infer.py command, seconds from the first worker's model loaded to the last
    result, the busiest worker's CPU seconds generating, the slowest worker's start-up: from the run's start,
    prompts read, to its model loaded and the prompts checked), as it prints them."""
    command = [sys.executable, str(Path(__file__).parent / "infer.py"), "--model", ckpt, "--data", str(data),
               "--output", str(out), "--num-workers", str(workers), "--batch-size", str(batch_size), "--tokenizer",
               "byte"] + (["--stop", *stop] if stop else [])
    whole, done = timed(lambda: subprocess.run(command, capture_output=True, text=True))
    if done.returncode != 0:
        raise SystemExit(f"tools/infer.py failed:\n{done.stderr}")
    cpu = max(map(float, re.findall(r"\(([\d.]+) s of CPU\)", done.stdout)))
    startup = max(map(float, re.findall(r"worker: ([\d.]+) s to start", done.stdout)))
    return whole, float(re.search(r"generating: ([\d.]+) s", done.stdout).group(1)), cpu, startup


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-new-tokens", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each comparison (medians)")
    p.add_argument("--model", default=None, help="a trained checkpoint (byte tokenizer); default: random weights")
    p.add_argument("--stop", default=None, help="a stop string (with a trained --model, e.g. a newline)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process comparison (1: steadier "
                   "on a shared machine)")
    p.add_argument("--no-infer", action="store_true", help="only static against continuous batching")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if not 1 <= args.min_new_tokens <= args.max_new_tokens or 40 + args.max_new_tokens > cfg.model.max_seq_len:
        print(f"error: need 1 <= --min-new-tokens <= --max-new-tokens and 40 + --max-new-tokens <= the model's "
              f"context ({cfg.model.max_seq_len})", file=sys.stderr)
        return 2
    prompts, limits = workload(args.prompts, args.min_new_tokens, args.max_new_tokens)
    stop = None if args.stop is None else [args.stop]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model
        if ckpt is None:
            from megatron_llm.model import build_model

            ckpt = str(Path(tmp) / "model")
            save_weights(Path(ckpt), build_model(cfg.model, "cpu", seed=0).state_dict(), cfg.to_dict())
        llm = LLM.load(ckpt, tokenizer="byte")
        b = args.batch_size

        def static():
            ids = [llm.tokenizer.encode(q) for q in prompts]  # token ids back, as continuous batching gives them
            return sum((llm.generate(ids[i : i + b], max_new_tokens=limits[i : i + b], stop=stop)
                        for i in range(0, len(prompts), b)), [])

        def continuous():
            done = dict(llm.batched(((i, q, n) for i, (q, n) in enumerate(zip(prompts, limits))), batch_size=b,
                                    stop=stop))
            return [done[i] for i in range(len(prompts))]

        runs = {"static": [], "continuous": []}
        same = len(prompts)  # rows equal in every run; a random model's near-tied logits can flip one
        for _ in range(args.repeats):
            outputs = {}
            for name, fn in (("static", static), ("continuous", continuous)):
                seconds, outputs[name] = timed(fn)
                runs[name].append(seconds)
            same = min(same, sum(a == b for a, b in zip(outputs["static"], outputs["continuous"])))
        produced = sum(map(len, outputs["static"]))
        t_static, t_cont = (statistics.median(runs[k]) for k in ("static", "continuous"))
        # the work each path does: static runs every row of a group for its longest row's steps
        static_rows = sum(max(limits[i : i + b]) * len(limits[i : i + b]) for i in range(0, len(limits), b))

        times = {}
        if not args.no_infer:
            data = Path(tmp) / "prompts.jsonl"
            data.write_text("".join(json.dumps({"prompt": q, "max_new_tokens": n}) + "\n" for q, n in zip(prompts, limits)))
            runs_infer = {1: [], 2: []}
            for _ in range(args.repeats):  # alternated, as above
                for workers in (1, 2):
                    runs_infer[workers].append(infer_run(ckpt, data, Path(tmp) / f"out{workers}.jsonl", workers, b, stop))
            times = {w: tuple(statistics.median(r[i] for r in runs) for i in range(4)) for w, runs in runs_infer.items()}
            same_infer = (Path(tmp) / "out1.jsonl").read_text() == (Path(tmp) / "out2.jsonl").read_text()

    print(f"{args.prompts} requests: prompts of 4-39 bytes of Python source, max_new_tokens per request uniform in "
          f"{args.min_new_tokens}..{args.max_new_tokens} (mean {statistics.mean(limits):.0f}), stop {stop}; "
          f"{produced} tokens generated; batch {b}, greedy, CPU fp32, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores")
    print(f"row-steps: static {static_rows} (a group runs to its longest row), requested {sum(limits)} "
          f"(ideal continuous/static {static_rows / sum(limits):.2f}x)")
    print(f"static batching      {t_static:7.2f} s   {produced / t_static:7.0f} tokens/s   (runs {', '.join(f'{t:.2f}' for t in runs['static'])})")
    print(f"continuous batching  {t_cont:7.2f} s   {produced / t_cont:7.0f} tokens/s   ratio {t_static / t_cont:.2f}x   "
          f"same tokens in {same}/{len(prompts)} rows   (runs {', '.join(f'{t:.2f}' for t in runs['continuous'])})")
    if times:
        for workers, (whole, generating, cpu, startup) in times.items():
            ratio = "" if workers == 1 else (f"   ratio {times[1][0] / whole:.2f}x whole, "
                                             f"{times[1][1] / generating:.2f}x generating, {times[1][2] / cpu:.2f}x CPU")
            print(f"Infer, {workers} worker{'s' if workers > 1 else ' '}    {whole:7.2f} s whole, {generating:6.2f} s "
                  f"generating ({produced / generating:5.0f} tokens/s), busiest worker {cpu:.2f} CPU s, start-up "
                  f"{startup:.2f} s{ratio}   (runs {', '.join(f'{w:.1f}/{g:.1f}' for w, g, _, _ in runs_infer[workers])})")
        print(f"Infer outputs of 1 and 2 workers equal: {same_infer}")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
