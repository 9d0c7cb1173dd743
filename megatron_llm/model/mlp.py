"""The feed-forward sublayer: gated (SwiGLU, GeGLU, ReGLU, gpt-oss's clamped SwiGLU) or plain (GELU, ReLU, squared
ReLU, SiLU, xIELU)."""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

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


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's gated activation (transformers' GptOssExperts._apply_gate): the gate g clamped to at most
    `limit`, g * sigmoid(alpha g); the up projection u clamped to [-limit, limit] and shifted, u + 1; their
    product. The clamps bound the activations of a model trained in low precision; the + 1 lets a zero up
    projection pass the gate through."""

    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha)

    def up(self, up: torch.Tensor) -> torch.Tensor:
        return up.clamp(-self.limit, self.limit) + 1


def activations(cfg: ModelConfig) -> tuple[Callable, Optional[Callable]]:
    """(the activation on w1's output, the function on w3's output before the product or None: w3 x as it is)."""
    if cfg.mlp == "swiglu_clamped":
        clamped = ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)
        return clamped, clamped.up
    return XIELU() if cfg.mlp == "xielu" else ACTIVATIONS[cfg.mlp], None  # xielu: a module, with parameters


class XIELU(nn.Module):
    """xIELU (Huang et al. 2024, arXiv:2411.13010; Apertus): x > 0: a_p x^2 + beta x; else
    a_n (expm1(min(x, eps)) - x) + beta x, with a_p = softplus(alpha_p) and a_n = beta + softplus(alpha_n)
    learned per layer. beta and eps are buffers kept in checkpoints, as Hugging Face's XIELUActivation
    stores them; the ops follow its Python path one for one, so fp32 outputs match exactly."""

    ALPHA_P, ALPHA_N, BETA, EPS = 0.8, 0.8, 0.5, -1e-6  # the paper's initial slopes and Hugging Face's constants

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.empty(1))
        self.alpha_n = nn.Parameter(torch.empty(1))
        self.register_buffer("beta", torch.empty(()))
        self.register_buffer("eps", torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The inverse softplus of the initial slopes (a_n's includes beta), as transformers draws them."""
        self.alpha_p.copy_(torch.tensor(self.ALPHA_P).expm1().log())
        self.alpha_n.copy_(torch.tensor(self.ALPHA_N - self.BETA).expm1().log())
        self.beta.fill_(self.BETA)
        self.eps.fill_(self.EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        negative = (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x
        return torch.where(x > 0, alpha_p * x * x + self.beta * x, negative)


class FeedForward(nn.Module):
    """Gated: w2(act(w1 x) * w3 x) (clamped SwiGLU: * up_act(w3 x)), with w1 the gate and w3 the up projection (HF gate_proj/up_proj).
    Plain: w2(act(w1 x)), with w1 the up projection; there is no w3. `hidden_dim` defaults to
    model.ffn_hidden_size (the shared experts of a MoE layer have their own)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: Optional[int] = None):
        super().__init__()
        dim, hidden_dim, bias = cfg.hidden_size, hidden_dim or cfg.ffn_hidden_size, cfg.mlp_bias
        self.act, self.up_act = activations(cfg)
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if cfg.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))  # [b, s, ffn_hidden]
        up = self.w3  # read once (a module __getattr__ each)
        if up is not None:
            h = h * (up(x) if self.up_act is None else self.up_act(up(x)))
        return self.w2(h)  # [b, s, hidden]
