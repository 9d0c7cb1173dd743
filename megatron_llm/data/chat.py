"""Post-training records -> token ids and per-token loss masks: chat templates, prompt/response, pairs.

A record's messages are rendered by the tokenizer's own chat template (the `chat_template` of the
tokenizer_config.json beside its tokenizer.json, run by jinja2 as transformers runs it) or, for the byte
tokenizer and tokenizers without one, by the DEFAULT TEMPLATE:

    <|system|>\\n{content}\\n          (and likewise <|user|>, <|tool|>: never trained on)
    <|assistant|>\\n{content}<eod>     (the header is not trained on; the content and the eod token are)

The loss mask marks the tokens the model is trained to predict: every token of the assistant turns
(their content and the template's end-of-turn text), or every token with `loss_on="all"`. A template
is rendered incrementally (the first i messages, then the first i + 1) and each new stretch of text is
tokenized on its own, so the mask follows the template's own text exactly; a template that rewrites
earlier turns when later ones arrive is refused with the message that shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_llm.data.tokenizer import HFTokenizer, Tokenizer
from megatron_llm.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("text", "chat", "prompt_response", "pairs")


@dataclass
class Encoded:
    """One record's documents, each (token ids,) or (token ids, loss mask) as the format writes them;
    `note` is "truncated" or "dropped" when --max-length cut or removed the record."""

    documents: list[tuple[np.ndarray, ...]]
    note: str = ""


class ChatTemplate:
    """The jinja2 chat template of a Hugging Face tokenizer, rendered as transformers renders it."""

    def __init__(self, source: str, variables: dict):
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UsageError("this tokenizer's chat_template needs jinja2: pip install jinja2") from None

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        self.template, self.variables, self.error = env.from_string(source), variables, TemplateError

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.variables)
        except self.error as e:
            raise ValueError(f"the chat template refused it: {e}") from None


def load_chat_template(tokenizer: Tokenizer) -> Optional[ChatTemplate]:
    """The chat template of an HF tokenizer's tokenizer_config.json, or None (the default template)."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    config_path = tokenizer.path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{name, template}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    variables = {}
    for key, value in config.items():  # bos_token, eos_token, ...: the names templates use
        if key.endswith("_token"):
            variables[key] = value.get("content") if isinstance(value, dict) else value
    return ChatTemplate(source, variables)


class RecordEncoder:
    """Turns one parsed JSON record of `fmt` into its documents (see FORMATS and tools/preprocess_data.py).

    Raises ValueError with the reason a record is malformed; the caller names the line.
    """

    def __init__(self, fmt: str, tokenizer: Tokenizer, text_field: str = "text", loss_on: str = "assistant",
                 max_length: Optional[int] = None):
        self.fmt, self.tokenizer, self.text_field = fmt, tokenizer, text_field
        self.loss_on, self.max_length = loss_on, max_length
        self.template = load_chat_template(tokenizer) if fmt != "text" else None

    def __call__(self, record: dict) -> Encoded:
        if self.fmt == "text":
            text = _field(record, self.text_field, str, "pick the text field with --text-field")
            return Encoded([(np.asarray(self.tokenizer.encode(text) + [self.tokenizer.eod], dtype=np.int32),)])
        if self.fmt == "pairs":
            return self._pair(record)
        if self.fmt == "prompt_response":
            messages = [{"role": "user", "content": _field(record, "prompt", str)},
                        {"role": "assistant", "content": _field(record, "response", str)}]
        else:
            messages = _messages(_field(record, "messages", list))
        ids, mask = self.conversation(messages)
        note = ""
        if self.max_length is not None and len(ids) > self.max_length:
            ids, mask, note = ids[: self.max_length], mask[: self.max_length], "truncated"
        if not mask[1:].any():  # nothing left to learn from (the first token is never a target)
            return Encoded([], "dropped")
        return Encoded([(ids, mask)], note)

    def _pair(self, record: dict) -> Encoded:
        """Two documents, chosen then rejected, each text or messages; a pair longer than --max-length is dropped."""
        sides = []
        for key in ("chosen", "rejected"):
            value = record.get(key) if isinstance(record, dict) else None
            if isinstance(value, str):
                ids = np.asarray(self.tokenizer.encode(value), dtype=np.int32)
            elif isinstance(value, list):
                ids = self.conversation(_messages(value))[0]
            else:
                raise ValueError(f"has no {key!r} field holding text or a list of messages")
            if len(ids) == 0:
                raise ValueError(f"its {key!r} side is empty")
            sides.append(ids)
        if self.max_length is not None and max(map(len, sides)) > self.max_length:
            return Encoded([], "dropped")
        return Encoded([(ids,) for ids in sides])

    def conversation(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 [n] and loss mask uint8 [n] of a conversation."""
        pieces = self._template_pieces(messages) if self.template is not None else self._default_pieces(messages)
        ids = [i for piece, _ in pieces for i in piece]
        if self.loss_on == "all":
            mask = [1] * len(ids)
        else:
            mask = [int(train) for piece, train in pieces for _ in piece]
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)

    def _default_pieces(self, messages: list[dict]) -> list[tuple[list[int], bool]]:
        encode, pieces = self.tokenizer.encode, []
        for m in messages:
            if m["role"] == "assistant":
                pieces += [(encode("<|assistant|>\n"), False), (encode(m["content"]) + [self.tokenizer.eod], True)]
            else:
                pieces.append((encode(f"<|{m['role']}|>\n{m['content']}\n"), False))
        return pieces

    def _template_pieces(self, messages: list[dict]) -> list[tuple[list[int], bool]]:
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self.template.render(messages[:i], add_generation_prompt=True)
                pieces.append((self._after(done, prompt), False))
                done = prompt
            text = self.template.render(messages[: i + 1], add_generation_prompt=False)
            pieces.append((self._after(done, text), m["role"] == "assistant"))
            done = text
        return pieces

    def _after(self, done: str, text: str) -> list[int]:
        if not text.startswith(done):
            raise UsageError(
                "the tokenizer's chat_template rewrites earlier turns when a message is added (e.g. it drops past "
                "reasoning), so the assistant tokens cannot be masked; use a template without that, or --loss-on all"
            )
        return self.tokenizer.encode(text[len(done):])


def _field(record, key: str, kind: type, hint: str = ""):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"has no {key!r} field" + (f"; {hint}" if hint else ""))
    if not isinstance(record[key], kind):
        raise ValueError(f"field {key!r} is {type(record[key]).__name__}, not {kind.__name__}")
    return record[key]


def _messages(messages: list) -> list[dict]:
    """Each message a {role, content} with a known role and text content."""
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {j} is not {{role: {'|'.join(ROLES)}, content: text}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def numbered_records(path: Path):
    """(line or row number, raw JSON line, bytes of the input file read so far) of a .jsonl, .jsonl.gz or
    .parquet file: the last drives the progress line, in the units of the file on disk."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        rows, size, number = max(file.metadata.num_rows, 1), path.stat().st_size, 0
        for batch in file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, json.dumps(row, default=str).encode(), size * number // rows
        return
    if path.suffix == ".gz":
        import gzip

        with open(path, "rb") as raw, gzip.open(raw, "rb") as f:
            for number, line in enumerate(f, start=1):
                yield number, line, raw.tell()  # compressed bytes read: approximate, ahead by one buffer
        return
    with open(path, "rb") as f:
        done = 0
        for number, line in enumerate(f, start=1):
            done += len(line)
            yield number, line, done


def check_input(path: Path) -> None:
    """Refuses an input the readers cannot open, before anything is written."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError(f"{path} is parquet, which needs pyarrow: pip install -e '.[parquet]' (or pyarrow), or export it as jsonl") from None
