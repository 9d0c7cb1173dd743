"""Tokenize a jsonl file into megatron-core's .bin/.idx pair (one document per line).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --tokenizer byte
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer path/to/tokenizer.json --text-field content --workers 8

Writes PREFIX.bin and PREFIX.idx (readable by megatron-core's IndexedDataset and by Megatron-LM);
with --channel-field FIELD, one PREFIX_VALUE.bin/.idx per distinct value of FIELD, and prints the blend
that makes each one a channel, as a ready-to-paste `--data.blend '[...]'` flag and as YAML for a config,
weighted by each channel's tokens (--equal-weights: 1.0 each). Bad input prints `error: ...` and exits 2.

Post-training data (megatron_llm/data/chat.py describes the templates):

    python tools/preprocess_data.py --format chat --input chats.jsonl.gz --output-prefix data/sft \
        --tokenizer path/to/tokenizer.json --channel-field source --max-length 4096
    python tools/preprocess_data.py --format prompt_response --input qa.parquet --output-prefix data/qa
    python tools/preprocess_data.py --format pairs --input prefs.jsonl --output-prefix data/prefs

--format chat reads {"messages": [{"role", "content"}, ...]}, prompt_response {"prompt", "response"}; both
write PREFIX.bin/.idx and the loss mask PREFIX.mask.bin/.idx (assistant tokens; --loss-on all: every token),
for training with data.format sft. --format pairs reads {"chosen", "rejected"}, each text or messages, and
writes them as consecutive documents, for data.format pairs. Inputs: .jsonl, .jsonl.gz, .parquet (pyarrow).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.data.chat import FORMATS  # noqa: E402
from megatron_llm.data.preprocess import preprocess  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="jsonl (or .jsonl.gz, .parquet) file, one JSON object per line")
    parser.add_argument("--format", default="text", choices=FORMATS,
                        help="text: pretraining documents; chat, prompt_response: conversations with a loss mask; pairs")
    parser.add_argument("--loss-on", default="assistant", choices=("assistant", "all"),
                        help="conversations: train on the assistant turns' tokens only, or on every token")
    parser.add_argument("--max-length", type=int, help="truncate conversations to this many tokens; drop longer pairs")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or the path of a Hugging Face tokenizer.json")
    parser.add_argument("--text-field", default="text", help="the JSON field holding each document's text")
    parser.add_argument("--channel-field", help="split the output by this JSON field's value (one dataset per channel)")
    parser.add_argument("--equal-weights", action="store_true",
                        help="blend weights of 1.0 for every channel instead of each channel's share of the tokens")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    args = parser.parse_args(argv)
    try:
        stats = preprocess(
            args.input, args.output_prefix, args.tokenizer, args.text_field, args.workers,
            channel_field=args.channel_field, fmt=args.format, loss_on=args.loss_on, max_length=args.max_length,
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(stats.summary())
    if args.channel_field:
        by_tokens = not args.equal_weights
        print(f"the blend, weighted {'by tokens' if by_tokens else 'equally'}; on the command line:")
        print(stats.blend_flag(by_tokens))
        print("or in a config:")
        print("data:\n  blend:\n" + stats.blend_lines(by_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
