"""A small conversation set and a preference-pair set that the project builds itself (no downloads), for
the README's SFT and reward runs, the tests and the SFT benchmark.

Four kinds of conversation, one channel each, of deliberately mixed lengths (a few tokens to a few
hundred bytes): `arithmetic` (sums), `echo` (a word repeated n times), `reverse` (a word spelled
backwards) and `count` (counting up to n). A pair's chosen answer is the correct one, its rejected
answer the same shape with the arithmetic off by one or the words in the wrong order, so a reward
model can learn to tell them apart only by reading them.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Optional

from megatron_llm.errors import ArgumentParser, UsageError
from megatron_llm.paths import writable_directory, write_atomically

WORDS = ("apple", "river", "stone", "cloud", "garden", "silver", "window", "candle", "forest", "yellow")
KINDS = ("arithmetic", "echo", "reverse", "count")


def conversation(kind: str, rng: random.Random) -> tuple[list[dict], str]:
    """(messages, a wrong assistant answer of the same shape)."""
    system = [{"role": "system", "content": "Answer exactly."}] if rng.random() < 0.5 else []
    if kind == "arithmetic":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        question, answer, wrong = f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice((-1, 1))}."
    elif kind == "echo":
        word, n = rng.choice(WORDS), rng.randint(1, 40)
        question, answer = f"Say '{word}' {n} times.", " ".join([word] * n)
        wrong = " ".join([word] * (n + 1))
    elif kind == "reverse":
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        question, answer = f"Reverse the letters: {' '.join(words)}", " ".join(w[::-1] for w in words)
        wrong = " ".join(words)
    else:
        n = rng.randint(1, 60)
        question, answer = f"Count from 1 to {n}.", " ".join(str(i) for i in range(1, n + 1))
        wrong = " ".join(str(i) for i in range(1, n + 1) if i != max(1, n // 2)) if n > 1 else "0"
    messages = system + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages, wrong


def conversations(n: int, seed: int = 0) -> list[dict]:
    """n records {"messages", "channel"} for tools/preprocess_data.py --format chat, kinds in turn."""
    rng = random.Random(seed)
    return [{"messages": conversation(KINDS[i % len(KINDS)], rng)[0], "channel": KINDS[i % len(KINDS)]} for i in range(n)]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """n records {"chosen", "rejected", "channel"} (both as messages) for --format pairs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        messages, wrong = conversation(kind, rng)
        rejected = messages[:-1] + [{"role": "assistant", "content": wrong}]
        out.append({"chosen": messages, "rejected": rejected, "channel": kind})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """python -m megatron_llm.data.synthetic_chat DIR [--conversations N] [--pairs N]: writes DIR/chats.jsonl
    and DIR/pairs.jsonl, each record with its kind as "channel", for tools/preprocess_data.py."""
    parser = ArgumentParser(prog="python -m megatron_llm.data.synthetic_chat", description=main.__doc__.split(":")[0])
    parser.add_argument("directory")
    parser.add_argument("--conversations", type=int, default=8000)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("conversations", "pairs"):  # an empty file would be refused only by the next step, preprocessing
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive number of records, got {getattr(args, flag)}")
    try:
        out = writable_directory(args.directory, "the directory")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for name, records in (("chats", conversations(args.conversations, args.seed)), ("pairs", pairs(args.pairs, args.seed))):
        write_atomically(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {out / name}.jsonl: {len(records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
