"""The feed-forward sublayer: gated (SwiGLU, GeGLU) or plain (GELU, ReLU)."""

import torch
import torch.nn.functional as F
from torch import nn

# GeGLU and GELU use exact (erf) GELU, which is Hugging Face's "gelu". The tanh approximation
# ("gelu_pytorch_tanh", Gemma) would need its own entry; no family we convert uses it.
ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


class FeedForward(nn.Module):
    """Gated: w2(act(w1 x) * w3 x), with w1 the gate and w3 the up projection (HF gate_proj/up_proj).
    Plain: w2(act(w1 x)), with w1 the up projection; there is no w3."""

    def __init__(self, dim: int, hidden_dim: int, kind: str, bias: bool):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if kind in ("swiglu", "geglu") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))  # [b, s, ffn_hidden]
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)  # [b, s, hidden]
