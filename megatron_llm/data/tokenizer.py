"""Tokenizers: the embedded byte-level one and a wrapper around a Hugging Face tokenizer.json.

Both expose the same small interface, which is all preprocessing and the dataset checks need:
`encode(text) -> list[int]` (no special tokens), `decode(ids) -> str`, `eod` (the end-of-document id
appended after every document) and `vocab_size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence, Union

from megatron_llm.errors import UsageError

# Tokens that end a document in common tokenizers (Llama 1/2, GPT-2/NeoX, Llama 3), in order of preference.
EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class Tokenizer(Protocol):
    eod: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256 is end-of-document. Needs no files."""

    eod = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json. End-of-document is its eos token: the `eos_token`
    of a tokenizer_config.json beside it if there is one, else the first of EOD_CANDIDATES it knows."""

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise UsageError(f"cannot load tokenizer {self.path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        names = list(EOD_CANDIDATES)
        config = self.path.parent / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                names.insert(0, eos)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise UsageError(
            f"tokenizer {self.path} has no end-of-document token (looked for {', '.join(names)}); "
            "add one of them to the tokenizer"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', or the path of a tokenizer.json (or of the directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"tokenizer file {path} not found; pass 'byte' or the path of a Hugging Face tokenizer.json")
    return HFTokenizer(path)
