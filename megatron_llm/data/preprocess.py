"""jsonl -> megatron-core .bin/.idx: one document per line, end-of-document token appended.

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
from typing import Iterator, Optional

import numpy as np

from megatron_llm.config import tag_safe
from megatron_llm.data.mcore import mcore
from megatron_llm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_llm.errors import UsageError
from megatron_llm.logging.progress import Progress
from megatron_llm.paths import writable_directory

CHUNK_LINES = 64  # lines per worker task: big enough to amortise the pipe, small enough to stream


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float
    outputs: dict[str, str]  # channel value ("" without --channel-field) -> output prefix
    channel_tokens: dict[str, int]  # channel value -> its tokens

    def summary(self) -> str:
        written = ", ".join(f"{prefix}.bin/.idx" for prefix in self.outputs.values())
        return f"wrote {written}: {self.documents} documents, {self.tokens} tokens in {self.seconds:.1f} s"

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


def _init_worker(tokenizer_spec: str, text_field: str, channel_field: Optional[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; no fork warning
    _worker.update(tokenizer=load_tokenizer(tokenizer_spec), field=text_field, channel_field=channel_field)


def _encode_line(item: tuple[int, bytes]) -> tuple[Optional[np.ndarray], str, int]:
    """(line number, raw line) -> (token ids + eod, or None for a blank line; channel; bytes consumed)."""
    lineno, line = item
    if not line.strip():
        return None, "", len(line)
    try:
        record = json.loads(line.strip())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UsageError(f"line {lineno} is not valid JSON ({where})") from None
    field = _worker["field"]
    if not isinstance(record, dict) or field not in record:
        raise UsageError(f"line {lineno} has no {field!r} field; pick the text field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise UsageError(f"line {lineno}: field {field!r} is {type(text).__name__}, not a string")
    channel = ""
    if _worker["channel_field"] is not None:
        channel_field = _worker["channel_field"]
        if record.get(channel_field) is None:
            raise UsageError(f"line {lineno} has no {channel_field!r} field (the --channel-field)")
        channel = str(record[channel_field])
    tokenizer: Tokenizer = _worker["tokenizer"]
    ids = tokenizer.encode(text)
    ids.append(tokenizer.eod)
    return np.asarray(ids, dtype=np.int32), channel, len(line)  # the builder narrows to its dtype


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


@contextmanager
def _encoded_lines(src: Path, tokenizer_spec: str, text_field: str, channel_field: Optional[str], workers: int):
    """Yields an iterator of _encode_line results in line order; workers > 1 runs a process pool."""
    if workers <= 1:
        _init_worker(tokenizer_spec, text_field, channel_field)
        yield map(_encode_line, _numbered_lines(src))
        return
    initargs = (tokenizer_spec, text_field, channel_field)
    with multiprocessing.Pool(workers, _init_worker, initargs) as pool:  # exit terminates
        yield pool.imap(_encode_line, _numbered_lines(src), CHUNK_LINES)


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_spec: str = "byte",
    text_field: str = "text",
    workers: int = 1,
    progress: bool = True,
    channel_field: Optional[str] = None,
) -> PreprocessStats:
    """Tokenizes every line's `text_field` of a jsonl file into `output_prefix`.bin/.idx, or, with
    `channel_field`, into one `output_prefix`_VALUE.bin/.idx per distinct value of that field.

    Raises UsageError (one line) for a missing input, a line that is not JSON or lacks a field,
    or an input without documents; nothing is left under the output names in that case.
    """
    start = time.perf_counter()
    src = Path(input_path)
    if not src.is_file():
        raise UsageError(f"input file {src} not found")
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(output_prefix)
    writable_directory(str(out.parent), "the directory of --output-prefix")
    _remove_stale_temporaries(out)

    # The workers start before megatron-core is imported (3 s), so that they tokenize meanwhile.
    with _encoded_lines(src, tokenizer_spec, text_field, channel_field, workers) as encoded:
        indexed = mcore("datasets.indexed_dataset")
        dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
        builders: dict[str, tuple] = {}  # channel -> (builder, final prefix, tmp prefix)
        bar = Progress(f"tokenizing {src.name}", src.stat().st_size / 1e6, "MB", enabled=progress)
        documents, channel_tokens = 0, {}
        try:
            for ids, channel, nbytes in encoded:
                bar.advance(nbytes / 1e6)
                if ids is None:
                    continue
                if channel not in builders:
                    final = Path(f"{out}_{tag_safe(channel)}") if channel_field else out
                    _refuse_same_file(channel, final, builders)
                    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                    builders[channel] = (indexed.IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype), final, tmp)
                builders[channel][0].add_document(ids, [len(ids)])
                documents += 1
                channel_tokens[channel] = channel_tokens.get(channel, 0) + len(ids)
            if documents == 0:
                raise UsageError(f"input file {src} holds no documents")
            for builder, _, tmp in builders.values():
                builder.finalize(f"{tmp}.idx")
            for _, final, tmp in builders.values():
                os.replace(f"{tmp}.bin", f"{final}.bin")  # .idx last: a pair with its .idx in place is complete
                os.replace(f"{tmp}.idx", f"{final}.idx")
        finally:
            bar.close()
            for builder, _, tmp in builders.values():
                builder.data_file.close()
                Path(f"{tmp}.bin").unlink(missing_ok=True)
                Path(f"{tmp}.idx").unlink(missing_ok=True)
    outputs = {channel: str(final) for channel, (_, final, _) in sorted(builders.items())}
    tokens = sum(channel_tokens.values())
    return PreprocessStats(documents, tokens, time.perf_counter() - start, outputs, channel_tokens)


def _refuse_same_file(channel: str, final: Path, builders: dict[str, tuple]) -> None:
    """Two channel values that become one file name ('a/b', 'a b', 'a_b') would mix their documents."""
    other = next((value for value, (_, path, _) in builders.items() if path == final), None)
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
