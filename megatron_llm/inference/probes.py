"""Debug probes on one text, by forward hooks on a plain model (nothing in model/ knows of them): how much a
layer turns its input, what a layer's output already predicts (the logit lens), and how much one token
attends to another, with the very masks, windows and soft-caps of training."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.attention_kernels import attention_probs


def _capture(module: nn.Module, run) -> tuple:
    """(args, kwargs, output) of `module`'s forward during run()."""
    seen: dict = {}

    def hook(mod, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"], seen["output"]


def _block(model: nn.Module, layer: int) -> nn.Module:
    if str(layer) not in model.layers:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{len(model.layers) - 1}")
    return model.layers[str(layer)]


def cos_distance(model: nn.Module, tokens: torch.Tensor, layer: int) -> list[float]:
    """1 - cos(input, output) of block `layer`'s hidden states, per token of tokens [1, s]."""
    (x, _), _, out = _capture(_block(model, layer), lambda: model(tokens))
    return (1 - F.cosine_similarity(x[0].float(), out[0].float(), dim=-1)).tolist()


def logit_lens(model: nn.Module, tokens: torch.Tensor, layer: int, k: int) -> list[tuple[int, float]]:
    """The k most likely next tokens at the last position when block `layer`'s output goes through the final
    norm and the head: (token id, probability) pairs."""
    _, _, out = _capture(_block(model, layer), lambda: model(tokens))
    with torch.no_grad():
        probs = model.logits(out[:, -1:]).float().softmax(-1)[0, -1]  # [vocab]
    top = probs.topk(min(k, probs.numel()))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def lens_tokens(model: nn.Module, tokens: torch.Tensor, layer: int) -> list[int]:
    """The logit lens's most likely next token at every position after block `layer`."""
    _, _, out = _capture(_block(model, layer), lambda: model(tokens))
    with torch.no_grad():
        return model.logits(out)[0].argmax(-1).tolist()


def attention_weights(model: nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Block `layer`'s attention probabilities [heads, s, s] on tokens [1, s]."""
    attention = _block(model, layer).attention
    (x,), kwargs, _ = _capture(attention, lambda: model(tokens))
    ctx = kwargs["ctx"]
    with torch.no_grad():
        q, k, _ = attention.qkv(x, ctx)
        return attention_probs(q, k, attention.rules, attention.scale, attention.alibi_slopes, ctx.keys,
                               None if getattr(attention, "sinks", None) is None else attention.sinks())[0]  # MLA: none


def attention_between(model: nn.Module, tokens: torch.Tensor, layer: int, token_a: int, token_b: int) -> list[float]:
    """The weight from query position token_a to key position token_b, per head."""
    s = tokens.shape[1]
    if not (0 <= token_a < s and 0 <= token_b < s):
        raise ValueError(f"token positions must be in 0..{s - 1}, got {token_a} and {token_b}")
    return attention_weights(model, tokens, layer)[:, token_a, token_b].tolist()


def table(header: list[str], rows: Iterable) -> str:
    """Rows as aligned text columns, numbers to 4 decimals."""
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)
