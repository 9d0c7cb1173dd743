"""jsonl -> megatron-core .bin/.idx: one document per line, end-of-document token appended; or, with a
post-training format (data/chat.py), conversations with a loss mask beside them, or preference pairs.

A loss mask is a second indexed pair, PREFIX.mask.bin/.idx, with one uint8 document per conversation
aligned token for token with PREFIX.bin (1: a token the model is trained to predict). Pairs are two
consecutive documents of PREFIX.bin, chosen then rejected. Inputs may be jsonl, gzip'd jsonl or parquet.

Worker processes parse and tokenize lines (ordered `imap`, so the output order is the input order);
the parent writes with megatron-core's `IndexedDatasetBuilder`. Both files are written under
temporary names beside the output (`.NAME.tmpPID.bin`) and moved into place at the end, .bin first
and .idx last, so an interrupted run never leaves a half-written pair under the final names; the next
run removes the temporary files of a process that is gone.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_llm.config import tag_safe
from megatron_llm.data.chat import Encoded, RecordEncoder, check_input, numbered_records
from megatron_llm.data.mcore import mcore
from megatron_llm.data.tokenizer import load_tokenizer
from megatron_llm.errors import UsageError
from megatron_llm.logging.progress import Progress
from megatron_llm.paths import writable_directory

CHUNK_LINES = 64  # lines per worker task: big enough to amortise the pipe, small enough to stream
MASK_SUFFIX = ".mask"  # PREFIX.mask.bin/.idx: the loss mask of a conversation dataset PREFIX
# The indexed pairs each format writes, by prefix suffix: tokens, and the loss mask of conversations.
STREAMS = {"text": ("",), "chat": ("", MASK_SUFFIX), "prompt_response": ("", MASK_SUFFIX), "pairs": ("",)}


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float
    outputs: dict[str, str]  # channel value ("" without --channel-field) -> output prefix
    channel_tokens: dict[str, int]  # channel value -> its tokens
    truncated: int = 0  # records cut to --max-length
    dropped: int = 0  # records left out: nothing to train on, or a pair longer than --max-length
    streams: tuple[str, ...] = ("",)  # the suffixes of the pairs written per output (STREAMS)

    def summary(self) -> str:
        written = ", ".join(f"{prefix}{suffix}.bin/.idx" for prefix in self.outputs.values() for suffix in self.streams)
        cut = f"; {self.truncated} truncated, {self.dropped} dropped" if self.streams != ("",) or self.truncated or self.dropped else ""
        return f"wrote {written}: {self.documents} documents, {self.tokens} tokens in {self.seconds:.1f} s{cut}"

    def blend_entries(self, by_tokens: bool = True) -> list[str]:
        """One data.blend entry per output, in YAML flow style; weight: the channel's share of the tokens
        (so the blend samples the corpus as it is), or 1.0 each."""
        total = sum(self.channel_tokens.values())
        return [
            # JSON strings are YAML strings, quoted whatever the channel value holds
            f"{{path: {json.dumps(prefix)}, weight: {self.channel_tokens[channel] / total if by_tokens else 1.0:.4g}, "
            f"name: {json.dumps(channel)}}}"
            for channel, prefix in self.outputs.items()
        ]

    def blend_lines(self, by_tokens: bool = True) -> str:
        """The data.blend entries for these outputs, to paste into a config."""
        return "\n".join(f"    - {entry}" for entry in self.blend_entries(by_tokens))

    def blend_flag(self, by_tokens: bool = True) -> str:
        """The same blend as a command-line override, quoted for a POSIX shell."""
        return "--data.blend " + shlex.quote("[" + ", ".join(self.blend_entries(by_tokens)) + "]")


# Worker state, set once per process by _init_worker (the tokenizer is too big to send per task).
_worker: dict = {}


def _init_worker(tokenizer_spec: str, encoding: dict, channel_field: Optional[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; no fork warning
    _worker.update(encode=RecordEncoder(tokenizer=load_tokenizer(tokenizer_spec), **encoding), channel_field=channel_field)


def _encode_line(item: tuple[int, bytes, int]) -> tuple[Optional[Encoded], str, int]:
    """(line number, raw line, input bytes read) -> (the record's documents, or None for a blank line;
    channel; input bytes read)."""
    lineno, line, done = item
    if not line.strip():
        return None, "", done
    try:
        record = json.loads(line.strip())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UsageError(f"line {lineno} is not valid JSON ({where})") from None
    try:
        encoded = _worker["encode"](record)
    except ValueError as e:
        raise UsageError(f"line {lineno} {e}") from None
    channel = ""
    if _worker["channel_field"] is not None:
        channel_field = _worker["channel_field"]
        if record.get(channel_field) is None:
            raise UsageError(f"line {lineno} has no {channel_field!r} field (the --channel-field)")
        channel = str(record[channel_field])
    return encoded, channel, done


@contextmanager
def _encoded_lines(src: Path, tokenizer_spec: str, encoding: dict, channel_field: Optional[str], workers: int):
    """Yields an iterator of _encode_line results in line order; workers > 1 runs a process pool."""
    if workers <= 1:
        _init_worker(tokenizer_spec, encoding, channel_field)
        yield map(_encode_line, numbered_records(src))
        return
    initargs = (tokenizer_spec, encoding, channel_field)
    with multiprocessing.Pool(workers, _init_worker, initargs) as pool:  # exit terminates
        yield pool.imap(_encode_line, numbered_records(src), CHUNK_LINES)


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_spec: str = "byte",
    text_field: str = "text",
    workers: int = 1,
    progress: bool = True,
    channel_field: Optional[str] = None,
    fmt: str = "text",
    loss_on: str = "assistant",
    max_length: Optional[int] = None,
) -> PreprocessStats:
    """Tokenizes every line's `text_field` of a jsonl file into `output_prefix`.bin/.idx, or, with
    `channel_field`, into one `output_prefix`_VALUE.bin/.idx per distinct value of that field. Other
    formats (`fmt`, see data/chat.py) read conversations or pairs instead, and conversations write their
    loss mask (`loss_on` "assistant" or "all") beside the tokens; `max_length` truncates conversations
    and drops longer pairs, both counted.

    Raises UsageError (one line) for a missing input, a line that is not JSON or lacks a field,
    or an input without documents; nothing is left under the output names in that case.
    """
    start = time.perf_counter()
    src = Path(input_path)
    if not src.is_file():
        raise UsageError(f"input file {src} {'is a directory' if src.is_dir() else 'not found'}: pass a jsonl file")
    check_input(src)
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")
    if workers < 1:
        raise UsageError(f"--workers must be positive (tokenizer processes), got {workers}")
    tokenizer = load_tokenizer(tokenizer_spec)
    streams = STREAMS[fmt]
    encoding = dict(fmt=fmt, text_field=text_field, loss_on=loss_on, max_length=max_length)
    out = Path(output_prefix)
    if out.is_dir():
        raise UsageError(f"--output-prefix {out} is a directory: give a name prefix in it, like {out / 'corpus'}")
    writable_directory(str(out.parent), "the directory of --output-prefix")
    _remove_stale_temporaries(out)

    # The workers start before megatron-core is imported (3 s), so that they tokenize meanwhile.
    with _encoded_lines(src, tokenizer_spec, encoding, channel_field, workers) as encoded:
        indexed = mcore("datasets.indexed_dataset")
        dtypes = [indexed.DType.optimal_dtype(tokenizer.vocab_size) if not suffix else np.uint8 for suffix in streams]
        # channel -> [(builder, final prefix, tmp prefix) per stream]; the token stream first
        builders: dict[str, list[tuple]] = {}
        bar = Progress(f"tokenizing {src.name}", src.stat().st_size / 1e6, "MB", enabled=progress)
        documents, channel_tokens, notes = 0, {}, {"truncated": 0, "dropped": 0, "": 0}
        try:
            for record, channel, done in encoded:
                bar.update(done / 1e6)
                if record is None:
                    continue
                notes[record.note] += 1
                if record.documents and channel not in builders:
                    base = Path(f"{out}_{tag_safe(channel)}") if channel_field else out
                    _refuse_same_file(channel, base, builders)
                    builders[channel] = []
                    for suffix, dtype in zip(streams, dtypes):
                        final = base.with_name(base.name + suffix)
                        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                        builders[channel].append((indexed.IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype), final, tmp))
                for arrays in record.documents:
                    for (builder, _, _), array in zip(builders[channel], arrays):
                        builder.add_document(array, [len(array)])
                    documents += 1
                    channel_tokens[channel] = channel_tokens.get(channel, 0) + len(arrays[0])
            if documents == 0:
                raise UsageError(f"input file {src} holds no documents" + (f" ({notes['dropped']} dropped)" if notes["dropped"] else ""))
            written = [entry for entries in builders.values() for entry in entries]
            for builder, _, tmp in written:
                builder.finalize(f"{tmp}.idx")
            for _, final, tmp in written:
                # .idx last: a pair with its .idx in place is complete. A replaced pair's old .idx goes first: stopped
                # between the renames, the new .bin is left without an index (refused), never read through the old one.
                Path(f"{final}.idx").unlink(missing_ok=True)
                os.replace(f"{tmp}.bin", f"{final}.bin")
                os.replace(f"{tmp}.idx", f"{final}.idx")
        finally:
            bar.close()
            for builder, _, tmp in (entry for entries in builders.values() for entry in entries):
                builder.data_file.close()
                Path(f"{tmp}.bin").unlink(missing_ok=True)
                Path(f"{tmp}.idx").unlink(missing_ok=True)
    outputs = {channel: str(entries[0][1]) for channel, entries in sorted(builders.items())}
    tokens = sum(channel_tokens.values())
    return PreprocessStats(documents, tokens, time.perf_counter() - start, outputs, channel_tokens,
                           notes["truncated"], notes["dropped"], streams)


def _refuse_same_file(channel: str, final: Path, builders: dict[str, list[tuple]]) -> None:
    """Two channel values that become one file name ('a/b', 'a b', 'a_b') would mix their documents."""
    other = next((value for value, entries in builders.items() if entries[0][1] == final), None)
    if other is not None:
        raise UsageError(
            f"--channel-field values {other!r} and {channel!r} both map to the file name {final.name}.bin; "
            "nothing was written: make the values differ in letters, digits, '_', '-' or '.'"
        )


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of this prefix left by a killed run (their process is gone) are removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}.*\.tmp(\d+)\.(bin|idx)$")
    for path in sorted(out.parent.iterdir()):
        found = pattern.match(path.name)
        if found and not _process_alive(int(found[1])):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            print(f"removed {path} ({size / 2**20:.1f} MiB), left by a preprocess run that was killed", file=sys.stderr)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
