"""`megatron_llm.LLM`: a trained model with its tokenizer, to generate with, score and inspect.

    llm = megatron_llm.LLM.load("checkpoints/tiny")            # native, Hugging Face or Megatron-LM
    llm.generate(["def ", "import "], max_new_tokens=40)      # -> two strings
    for piece in llm.stream_generate("class ", max_new_tokens=40): print(piece, end="")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from megatron_llm.checkpoint.convert import detect_format, load_model
from megatron_llm.checkpoint.native import read_config, resolve_checkpoint
from megatron_llm.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from megatron_llm.errors import UsageError
from megatron_llm.inference import probes
from megatron_llm.inference.batching import continuous_batches
from megatron_llm.inference.devices import spread_over, usable_device
from megatron_llm.inference.generate import Sampling, generate_ids, stream_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Prompt = Union[str, Sequence[int]]


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, stop_tokens: frozenset):
        self.model, self.tokenizer, self.stop_tokens = model, tokenizer, stop_tokens
        self._device_hooks: list = []

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "fp32", tokenizer: Optional[str] = None) -> "LLM":
        """Any checkpoint the converter reads, with its tokenizer: `tokenizer` ('byte' or a tokenizer.json)
        when given, else the one a native run trained with, else the checkpoint's tokenizer.json, else the
        byte tokenizer for a 257-token vocabulary. Stop tokens: the tokenizer's end of document and
        generation_config.json's eos_token_id."""
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return cls.around(load_model(str(path), usable_device(device), DTYPES[dtype]), path, tokenizer)

    @classmethod
    def around(cls, model: torch.nn.Module, path: str, tokenizer: Optional[str] = None) -> "LLM":
        """A model already loaded from the checkpoint at `path` (Infer's shared weights), with the tokenizer
        and stop tokens load() would give it."""
        tok = load_tokenizer(tokenizer or tokenizer_of(Path(path), model.cfg.vocab_size))
        return cls(model, tok, frozenset({tok.eod, *_generation_eos(Path(path))}))

    # ---------------------------------------------------------------------------------------------
    # generation

    def generate(self, prompts: Union[Prompt, list[Prompt]], max_new_tokens: Union[int, list[int]] = 64,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 stop: Optional[list] = None, seed: Optional[int] = None):
        """Continuations of a batch of prompts (strings, or token-id lists: then ids come back), or of one.
        Each row stops at a stop token (the model's, or ints in `stop`), once its text holds a string of
        `stop`, or after max_new_tokens (one for all, or one per prompt); a stop string stays in the text, a
        stop token is left out of it (kept in returned ids)."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        as_text = isinstance(batch[0], str)
        limits = [max_new_tokens] * len(batch) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(batch) or not all(_positive_int(n) for n in limits):
            raise UsageError(f"max_new_tokens must be a positive int or one per prompt ({len(batch)}), got {max_new_tokens!r}")
        sampling, strings = self._sampling(max(limits), temperature, top_k, top_p, stop, seed)
        ids = generate_ids(self.model, [self._ids(p) for p in batch], sampling, self._stop_check(strings), limits)
        out = [self._text(row) for row in ids] if as_text else ids
        return out[0] if single else out

    def stream_generate(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None, stop: Optional[list] = None,
                        seed: Optional[int] = None) -> Iterator[str]:
        """The text of generate(prompt) in pieces as it is decoded; a character of several tokens (bytes)
        is held back until it is complete, so the pieces joined equal generate's text."""
        sampling, strings = self._sampling(max_new_tokens, temperature, top_k, top_p, stop, seed)
        ids: list[int] = []
        sent = ""
        for (token,) in stream_ids(self.model, [self._ids(prompt)], sampling, self._stop_check(strings)):
            ids.append(token)
            text = self._text(ids)
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence decodes to the replacement char
                yield text[len(sent):]
                sent = text
        if self._text(ids) != sent:
            yield self._text(ids)[len(sent):]

    def batched(self, prompts: Iterable[tuple], batch_size: int = 8, max_new_tokens: int = 64,
                temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                stop: Optional[list] = None, seed: Optional[int] = None) -> Iterator[tuple[object, list[int]]]:
        """(key, new token ids) for each (key, prompt) or (key, prompt, its own max_new_tokens), as they
        finish: `batch_size` sequences decode at once and a finished one's slot goes to the next prompt at
        once (continuous batching)."""
        sampling, strings = self._sampling(max_new_tokens, temperature, top_k, top_p, stop, seed)
        return continuous_batches(self.model, self._requests(prompts, max_new_tokens), sampling, batch_size,
                                  self._stop_check(strings))

    def _requests(self, prompts: Iterable[tuple], default: int) -> Iterator[tuple[object, list[int], int]]:
        for key, prompt, *limit in prompts:
            new_tokens = limit[0] if limit else default
            if len(limit) > 1 or not _positive_int(new_tokens):
                raise UsageError(f"request {key!r}: give (key, prompt) or (key, prompt, max_new_tokens > 0)")
            yield key, self._ids(prompt), new_tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, stop tokens left out."""
        return self._text(ids)

    def set_device(self, devices: list[str]) -> "LLM":
        """Spreads the layers over `devices` in order (embedding on the first, head on the last)."""
        for handle in self._device_hooks:
            handle.remove()
        self._device_hooks = spread_over(self.model, [usable_device(d) for d in devices])
        return self

    @torch.no_grad()
    def reward(self, texts: list[Prompt]) -> list[float]:
        """A reward model's scores (model.head score): the head's value at each text's last token, as
        transformers' *ForSequenceClassification reads it."""
        if self.model.cfg.head != "score":
            raise UsageError("reward() needs a reward model (model.head score); this one predicts tokens")
        rows = [self._ids(t) for t in texts]
        width = max(map(len, rows))
        tokens = self.tensor([0] * width).new_tensor([r + [0] * (width - len(r)) for r in rows])  # [b, s] right-padded
        scores = self.model(tokens)[..., 0]  # [b, s]: causal, so a last real token sees none of the padding
        return scores[torch.arange(len(rows)), [len(r) - 1 for r in rows]].float().tolist()

    # ---------------------------------------------------------------------------------------------
    # probes (inference/probes.py): plain numbers back, a readable table printed

    def show_cos_distance(self, text: Prompt, layer: int) -> list[float]:
        values = probes.cos_distance(self.model, self.tensor(text), layer)
        print(probes.table(["token", "cos distance"], zip(self._pieces(text), values)))
        return values

    def show_topk_token(self, text: Prompt, layer: int, k: int = 10) -> list[tuple[str, float]]:
        pairs = [(self._text([t]), p) for t, p in probes.logit_lens(self.model, self.tensor(text), layer, k)]
        print(probes.table(["token", "probability"], pairs))
        return pairs

    def show_attention(self, text: Prompt, layer: int, token_a: int, token_b: int) -> dict[str, float]:
        weights = probes.attention_between(self.model, self.tensor(text), layer, token_a, token_b)
        result = {f"head {h}": w for h, w in enumerate(weights)} | {"mean": sum(weights) / len(weights)}
        print(probes.table(["head", f"attention {token_a} -> {token_b}"], result.items()))
        return result

    # ---------------------------------------------------------------------------------------------
    def _sampling(self, max_new_tokens, temperature, top_k, top_p, stop, seed) -> tuple[Sampling, list[str]]:
        stop = [] if stop is None else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, (str, int)) for s in stop):
            raise UsageError(f"stop must be a list of strings and/or token ids, got {stop!r}")
        tokens = self.stop_tokens | {s for s in stop if isinstance(s, int)}
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, frozenset(tokens), seed)
        return sampling, [s for s in stop if isinstance(s, str)]

    def _stop_check(self, strings: list[str]):
        if not strings:
            return None
        return lambda row, ids: any(s in self._text(ids) for s in strings)

    def _ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def tensor(self, prompt: Prompt) -> torch.Tensor:
        """A prompt as token ids [1, s] on the model's first device; one the model cannot read at once is refused."""
        ids, context = self._ids(prompt), self.model.cfg.max_seq_len
        if not 0 < len(ids) <= context:
            raise UsageError(f"the text has {len(ids)} tokens and the model reads 1 to {context} at once: give a shorter "
                             "(non-empty) text")
        return torch.tensor([ids], device=next(self.model.parameters()).device)

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stop_tokens])

    def _pieces(self, prompt: Prompt) -> list[str]:
        return [repr(self.tokenizer.decode([i])) for i in self._ids(prompt)]


def _positive_int(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def tokenizer_of(path: Path, vocab_size: int) -> str:
    if detect_format(str(path)) == "native":
        saved = read_config(resolve_checkpoint(str(path))).get("data", {}).get("tokenizer")
        if saved:
            return saved
    if (path / "tokenizer.json").is_file():
        return str(path / "tokenizer.json")
    if vocab_size == ByteTokenizer.vocab_size:
        return "byte"
    raise UsageError(f"{path} has no tokenizer.json and its vocabulary ({vocab_size}) is not the byte tokenizer's: "
                     "pass tokenizer='path/to/tokenizer.json'")


def _generation_eos(path: Path) -> list[int]:
    """eos_token_id of generation_config.json (an int or a list), when the checkpoint has one."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
