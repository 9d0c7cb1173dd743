"""The feed-forward sublayer: gated (SwiGLU, GeGLU, ReGLU) or plain (GELU, ReLU, squared ReLU, SiLU)."""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model_config import ModelConfig


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Primer; Nemotron)."""
    return F.relu(x).square()


_gelu_tanh = functools.partial(F.gelu, approximate="tanh")  # Hugging Face's gelu_new / gelu_pytorch_tanh

# model.mlp -> the activation on w1's output. Gated kinds multiply it by w3's output (config.GATED_MLPS).
ACTIVATIONS = {
    "swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": _gelu_tanh, "reglu": F.relu,
    "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "relu2": _relu2, "silu": F.silu,
}


class FeedForward(nn.Module):
    """Gated: w2(act(w1 x) * w3 x), with w1 the gate and w3 the up projection (HF gate_proj/up_proj).
    Plain: w2(act(w1 x)), with w1 the up projection; there is no w3. `hidden_dim` defaults to
    model.ffn_hidden_size (the shared experts of a MoE layer have their own)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: Optional[int] = None):
        super().__init__()
        dim, hidden_dim, bias = cfg.hidden_size, hidden_dim or cfg.ffn_hidden_size, cfg.mlp_bias
        self.act = ACTIVATIONS[cfg.mlp]
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if cfg.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))  # [b, s, ffn_hidden]
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)  # [b, s, hidden]
