"""jsonl -> megatron-core .bin/.idx: one document per line, end-of-document token appended.

Worker processes parse and tokenize lines (ordered `imap`, so the output order is the input order);
the parent writes with megatron-core's `IndexedDatasetBuilder`. Both files are written under
temporary names beside the output and moved into place at the end, .bin first and .idx last, so an
interrupted run never leaves a half-written pair under the final names.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megatron_llm.data.mcore import mcore
from megatron_llm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_llm.errors import UsageError

CHUNK_LINES = 64  # lines per worker task: big enough to amortise the pipe, small enough to stream


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float

    def summary(self, output_prefix: str) -> str:
        return (
            f"wrote {output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens "
            f"in {self.seconds:.1f} s"
        )


# Worker state, set once per process by _init_worker (the tokenizer is too big to send per task).
_worker: dict = {}


def _init_worker(tokenizer_spec: str, text_field: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; no fork warning
    _worker.update(tokenizer=load_tokenizer(tokenizer_spec), field=text_field)


def _encode_line(item: tuple[int, bytes]) -> tuple[Optional[np.ndarray], int]:
    """(line number, raw line) -> (token ids + eod, or None for a blank line; bytes consumed)."""
    lineno, line = item
    if not line.strip():
        return None, len(line)
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
    tokenizer: Tokenizer = _worker["tokenizer"]
    ids = tokenizer.encode(text)
    ids.append(tokenizer.eod)
    return np.asarray(ids, dtype=np.int32), len(line)  # the builder narrows to its dtype


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


@contextmanager
def _encoded_lines(src: Path, tokenizer_spec: str, text_field: str, workers: int):
    """Yields an iterator of _encode_line results in line order; workers > 1 runs a process pool."""
    if workers <= 1:
        _init_worker(tokenizer_spec, text_field)
        yield map(_encode_line, _numbered_lines(src))
        return
    with multiprocessing.Pool(workers, _init_worker, (tokenizer_spec, text_field)) as pool:  # exit terminates
        yield pool.imap(_encode_line, _numbered_lines(src), CHUNK_LINES)


class _SimpleBar:
    """Stand-in for tqdm: one carriage-returned line on stderr, redrawn at most twice a second."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._drawn = total, desc, 0, 0.0

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self._drawn > 0.5:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        pct = 100.0 * self.n / max(self.total, 1)
        sys.stderr.write(f"\r{self.desc}: {pct:5.1f}% of {self.total / 1e6:.1f} MB")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw()
        sys.stderr.write("\n")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm when importable (it comes with transformers/huggingface_hub), else _SimpleBar; only on a terminal."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_spec: str = "byte",
    text_field: str = "text",
    workers: int = 1,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenizes every line's `text_field` of a jsonl file into `output_prefix`.bin/.idx.

    Raises UsageError (one line) for a missing input, a line that is not JSON or lacks the field,
    or an input without documents; nothing is left under the output names in that case.
    """
    start = time.perf_counter()
    src = Path(input_path)
    if not src.is_file():
        raise UsageError(f"input file {src} not found")
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp}.bin"), Path(f"{tmp}.idx")

    # The workers start before megatron-core is imported (3 s), so that they tokenize meanwhile.
    with _encoded_lines(src, tokenizer_spec, text_field, workers) as encoded:
        indexed = mcore("datasets.indexed_dataset")
        builder = indexed.IndexedDatasetBuilder(str(tmp_bin), dtype=indexed.DType.optimal_dtype(tokenizer.vocab_size))
        bar = _progress_bar(src.stat().st_size, f"tokenizing {src.name}", progress)
        documents = tokens = 0
        try:
            for ids, nbytes in encoded:
                bar.update(nbytes)
                if ids is not None:
                    builder.add_document(ids, [len(ids)])
                    documents += 1
                    tokens += len(ids)
            if documents == 0:
                raise UsageError(f"input file {src} holds no documents")
            builder.finalize(str(tmp_idx))
            os.replace(tmp_bin, f"{out}.bin")  # .idx last: a pair with its .idx in place is complete
            os.replace(tmp_idx, f"{out}.idx")
        finally:
            bar.close()
            builder.data_file.close()
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
    return PreprocessStats(documents, tokens, time.perf_counter() - start)
