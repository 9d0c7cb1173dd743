"""LFM2's gated short convolution (Liquid AI), the token mixer of its `short_conv` layers in the attention slot:

    y = out_proj(C * conv(B * x))

with B, C and x three projections of the input and conv a causal depthwise convolution of a few taps over the
channels. Its only state is the convolution's last inputs, carried between forwards in the cache (model/kv_cache.py)
for decoding. The checkpoints' fused in_proj [B; C; x] is kept as three projections (b_proj, c_proj, x_proj) so that
tensor parallelism splits them, and the convolution's channels, alike.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.linear_attention import causal_conv, sequence_state
from megatron_llm.model.mamba import ConvTaps
from megatron_llm.model_config import LayerSpec, ModelConfig


class ShortConv(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.short_conv_bias
        self.kernel = cfg.short_conv_kernel
        self.b_proj, self.c_proj, self.x_proj = (nn.Linear(h, h, bias=bias) for _ in range(3))
        self.conv = ConvTaps(h, self.kernel, bias)
        self.out_proj = nn.Linear(h, h, bias=bias)
        self.rope = None  # no positions: the convolution is ordered

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """The convolution as nn.Conv1d's depthwise one (uniform in +-1/sqrt(taps)), bias 0; the projections are the
        Transformer's (init_weights)."""
        self.conv.weight.uniform_(-self.kernel ** -0.5, self.kernel ** -0.5, generator=generator)
        if self.conv.bias is not None:
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, *, ctx: AttentionContext) -> torch.Tensor:
        x, (history, _) = sequence_state(self, x, ctx, "a short-convolution layer")
        taps = self.conv()  # [channels (this rank's), kernel (+ bias)]
        y, history = causal_conv(self.b_proj(x) * self.x_proj(x), taps[:, :self.kernel], history)  # [b, s, channels]
        if taps.shape[1] > self.kernel:
            y = y + taps[:, self.kernel].to(y.dtype)
        if ctx.cache is not None:
            ctx.cache.keep(self, history, None)
        return self.out_proj(self.c_proj(x) * y)
