"""The decoder-only Transformer, its initialisation, the per-token loss and the FLOPs count for MFU.

Parameter names are fixed: the checkpoint tables in `checkpoint/` and the parallel plans in
`parallel/` are keyed by them. Blocks live in a ModuleDict keyed by the global layer index, so a
pipeline stage deletes the blocks it does not own (and sets tok_embeddings, norm or output to None)
while every remaining name stays the same as in the full model.
"""

import math
import zlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.config import ModelConfig
from megatron_llm.model.attention import Attention
from megatron_llm.model.mlp import FeedForward
from megatron_llm.model.norms import RMSNorm, build_norm
from megatron_llm.model.rope import rope_tables


class TransformerBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.mlp, cfg.linear_bias)

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope_cos, rope_sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab], or per-token losses [b, s] when labels are given.

    On a pipeline stage without tok_embeddings the input is hidden states [b, s, hidden]; on one
    without output the result is hidden states. Construct on the meta device and call
    init_weights(seed) after to_empty() (see build_model): __init__ allocates nothing worth keeping.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.num_layers)})
        self.norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Derived from the config, so kept out of checkpoints; filled by init_weights on the real device.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)

    def tie_weights(self) -> None:
        """Makes output.weight the very Parameter of tok_embeddings.weight (when tied and both exist).
        to_empty() gives each module its own new tensor, so build_model ties again after it."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def _sparse_embedding_grad(self) -> bool:
        """Whether the lookup may return a sparse gradient (only the rows of this batch's tokens). Tied to
        the head of this same module, autograd adds it into the head's dense gradient in one buffer,
        which saves zero-filling and adding a second [vocab, hidden] tensor: 1.5-2% of a 100M model's
        CPU step. Not when the head is elsewhere or the embedding untied (AdamW needs a dense gradient), nor
        for a tensor subclass (the DTensor shards of tensor and data parallelism, applied with hooks
        on the module)."""
        weight = self.tok_embeddings.weight
        return self.output is not None and self.output.weight is weight and type(weight) is nn.Parameter

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights; wo and w2 at init_std / sqrt(2 * num_layers) when scaled_init,
        since each block adds their outputs to the residual stream (GPT-2). Norms 1, biases 0.

        Each weight draws from its own generator, seeded by `seed` and the module's name, so a pipeline
        stage holding only some of the modules initialises them to the very values of the full model.
        A tied head is drawn under the embedding's name: both copies of a split pipeline start equal.
        """
        cfg = self.cfg
        self.rope_cos, self.rope_sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling, self.rope_cos.device
        )
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scaled_init else cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out_proj = name.endswith(("attention.wo", "feed_forward.w2"))
                key = "tok_embeddings" if name == "output" and cfg.tie_embeddings else name
                generator = torch.Generator(module.weight.device).manual_seed(seed + zlib.crc32(key.encode()))
                std = out_std if is_out_proj else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.tok_embeddings is None:  # a later pipeline stage: hidden states [b, s, hidden] already
            h = tokens
        elif self._sparse_embedding_grad():
            h = F.embedding(tokens, self.tok_embeddings.weight, sparse=True)
        else:
            h = self.tok_embeddings(tokens)  # [b, s, hidden]; through the module, where tp hooks in
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        logits = self.output(h)  # [b, s, vocab]
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits if labels is None else token_cross_entropy(logits, labels)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32; tokens whose label is negative get 0.

    Returned unreduced so the caller can sum per data channel and divide by a token count it chose.
    Labels are the next tokens, already shifted (unlike Hugging Face's loss, which shifts inside).
    """
    labels = torch.where(labels < 0, -100, labels)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return loss.view(labels.shape)


def build_model(cfg: ModelConfig, device: Union[torch.device, str], seed: Optional[int] = None) -> Transformer:
    """Builds on the meta device, allocates once on `device`, then initialises (seeded when asked)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed if seed is not None else int(torch.randint(2**31, ())))
    return model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the forward and backward matmuls, with N the
    non-embedding parameters plus the output head (a lookup costs nothing, the head is a matmul even
    when tied), plus 12 * layers * heads * head_dim * seq_len for the attention scores and values.
    The causal mask is not discounted, as in PaLM and Megatron's MFU."""
    n = cfg.num_params(include_embedding=False) + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
