"""The decoder-only Transformer, its initialisation, the per-token loss, and parameter and FLOPs counts.

Parameter names are fixed: the checkpoint tables in `checkpoint/` and the parallel plans in
`parallel/` are keyed by them. Blocks live in a ModuleDict keyed by the global layer index, so a
pipeline stage deletes the blocks it does not own (and sets tok_embeddings, norm or output to None)
while every remaining name stays the same as in the full model.
"""

import functools
import math
import zlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.attention import Attention, AttentionContext, HeadSinks
from megatron_llm.model.attention_kernels import NO_MASK, KeyMask, alibi_slopes
from megatron_llm.model.kv_cache import KVCache
from megatron_llm.model.linear_attention import GatedDeltaNet
from megatron_llm.model.mamba import Mamba2
from megatron_llm.model.short_conv import ShortConv
from megatron_llm.model.mla import LatentAttention
from megatron_llm.model.mlp import XIELU, FeedForward
from megatron_llm.model.moe import GroupedExperts, MoE, Router
from megatron_llm.model.mtp import MultiTokenPrediction
from megatron_llm.model.norms import RMSNorm, build_norm
from megatron_llm.model.rope import rope_tables
from megatron_llm.model_config import LayerSpec, ModelConfig


class TransformerBlock(nn.Module):
    """One block with fixed slot names; the topology is chosen once, here, from the config:

      pre / sandwich / output-norm:  h = x + m * post(sublayer(pre(x)))     (absent norms are identities)
      post-residual (post, deepnorm):  h = norm(alpha * x + sublayer(x))
      parallel:  h = x + m * (attention(n1(x)) + feed_forward(n2(x)))   (n2 = n1 when shared)

    A block of one sublayer (model.single_sublayer: Nemotron-H, Mamba-2) lacks the other's slots and its step.

    A slot a topology does not use is None; new slots only add names, so the checkpoint tables and the
    tensor-parallel plan are keyed by the same names in every topology.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        placement = cfg.norm_placement
        post_sublayer = placement in ("sandwich", "output")
        mixer, ffn = spec.sublayers != "ffn", spec.sublayers != "mixer"  # a block of one sublayer lacks the other's slots
        self.attention_norm = build_norm(cfg) if placement != "output" and mixer else None
        attention = LatentAttention if cfg.attention == "mla" else Attention
        mixers = {"linear": GatedDeltaNet, "mamba": Mamba2, "short_conv": ShortConv}
        self.attention = mixers.get(spec.mixer, attention)(cfg, spec) if mixer else None
        self.attention_post_norm = build_norm(cfg) if post_sublayer and mixer else None
        shares_norm = cfg.parallel_residual and cfg.parallel_shared_norm
        self.ffn_norm = build_norm(cfg) if placement != "output" and not shares_norm and ffn else None
        self.feed_forward = (MoE(cfg) if spec.moe else FeedForward(cfg)) if ffn else None
        self.ffn_post_norm = build_norm(cfg) if ffn and (post_sublayer or (spec.moe and cfg.moe_post_norm)) else None
        self.parallel = cfg.parallel_residual
        self.post_residual = placement in ("post", "deepnorm")
        self.alpha, self.multiplier = cfg.residual_alpha, cfg.residual_multiplier
        # Gemma 4's stored scale of the block's whole output [1]: a checkpoint's value, not trained (init_weights: 1)
        self.register_buffer("layer_scalar", torch.empty(1) if cfg.layer_scalar else None)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.parallel:
            a = self.attention_norm(x)
            f = a if self.ffn_norm is None else self.ffn_norm(x)
            h = x + self._scaled(self.attention(a, ctx=ctx) + self.feed_forward(f))
        else:
            h = x
            if self.attention is not None:
                h = self._residual(h, self.attention_norm, functools.partial(self.attention, ctx=ctx), self.attention_post_norm)
            if self.feed_forward is not None:
                h = self._residual(h, self.ffn_norm, self.feed_forward, self.ffn_post_norm)
        return h if self.layer_scalar is None else h * self.layer_scalar

    def _residual(self, x: torch.Tensor, norm, sublayer, post_norm) -> torch.Tensor:
        if self.post_residual:
            return norm(x * self.alpha + sublayer(x)) if self.alpha != 1.0 else norm(x + sublayer(x))
        y = sublayer(x if norm is None else norm(x))
        return x + self._scaled(y if post_norm is None else post_norm(y))

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.multiplier == 1.0 else y * self.multiplier


class Transformer(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab], or per-token losses [b, s] when labels are given.

    On a pipeline stage without the FIRST_STAGE modules the input is hidden states [b, s, hidden]; on one
    without the LAST_STAGE modules the result is hidden states. Construct on the meta device and call
    init_weights(seed) after to_empty() (see build_model): __init__ allocates nothing worth keeping.
    With multi-token prediction (model/mtp.py) a training-mode forward also leaves the depths' logits on `mtp`.
    """

    FIRST_STAGE = ("tok_embeddings", "pos_embeddings", "embedding_norm")
    LAST_STAGE = ("norm", "output", "mtp")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = _table(cfg.vocab_size, cfg.hidden_size)
        # Absolute positions, learned or fixed, fill one slot: the tensor-parallel plan shards either alike.
        table = {"learned": _table, "sinusoidal": SinusoidalPositions}.get(cfg.position)
        self.pos_embeddings = table(cfg.max_seq_len + cfg.position_offset, cfg.hidden_size) if table else None
        self.embedding_norm = build_norm(cfg) if cfg.embedding_norm else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, cfg.layer(i)) for i in range(cfg.num_layers)})
        # Post-residual blocks end in a norm already; every other topology needs a final one.
        self.norm = build_norm(cfg) if cfg.norm_placement not in ("post", "deepnorm") else None
        outputs = cfg.head_vocab_size if cfg.head == "lm" else 1  # score: one scalar per position; a pruned head fewer
        self.output = (NormHead if cfg.norm_head else nn.Linear)(cfg.hidden_size, outputs, bias=cfg.output_bias)
        # Multi-token prediction (model/mtp.py): extra blocks of the last decoder layer's kind, training only.
        last = cfg.layer(cfg.num_layers - 1)
        self.mtp = MultiTokenPrediction(cfg, lambda: TransformerBlock(cfg, last)) if cfg.mtp_layers else None
        self.tie_weights()
        # Derived from the config, so kept out of checkpoints; filled by init_weights on the real device.
        self.rope_names = tuple(sorted({getattr(layer.attention, "rope", None) for layer in self.layers.values()} - {None}))
        for name in self.rope_names:
            for part in ("cos", "sin"):
                self.register_buffer(_rope_buffer(name, part), torch.empty(cfg.max_seq_len, cfg.table_rope_dim(name) // 2),
                                     persistent=False)

    def tie_weights(self) -> None:
        """Makes output.weight the very Parameter of tok_embeddings.weight (when tied and both exist).
        to_empty() gives each module its own new tensor, so build_model ties again after it."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def blocks(self) -> list[nn.Module]:
        """The decoder blocks, then the MTP depths' blocks: every block the parallel layers treat one by one
        (tensor and expert parallelism, activation checkpointing, compilation, data-parallel units)."""
        mtp = self.mtp.layers.values() if self.mtp else ()
        return [*self.layers.values(), *(layer.block for layer in mtp)]

    def _sparse_embedding_grad(self) -> bool:
        """Whether the lookup may return a sparse gradient (only the rows of this batch's tokens). Tied to
        the head of this same module, autograd adds it into the head's dense gradient in one buffer,
        which saves zero-filling and adding a second [vocab, hidden] tensor: 1.5-2% of a 100M model's
        CPU step. Not when the head is elsewhere or the embedding untied (AdamW needs a dense gradient), nor
        for a tensor subclass (the DTensor shards of tensor and data parallelism, applied with hooks
        on the module). Nor without autograd, which also spares a decoding step three module look-ups."""
        if not torch.is_grad_enabled():
            return False
        weight = self.tok_embeddings.weight
        return self.output is not None and self.output.weight is weight and type(weight) is nn.Parameter

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights; wo and w2 at init_std / sqrt(2 * num_layers) when scaled_init,
        since each block adds their outputs to the residual stream (GPT-2); DeepNorm's value, output and
        MLP projections times its beta. Norms 1 (0 for unit-offset weights), biases 0; the derived
        buffers (RoPE tables, ALiBi slopes, the sinusoid table) computed.

        Each weight draws from its own generator, seeded by `seed` and the module's name, so a pipeline
        stage holding only some of the modules initialises them to the very values of the full model.
        A tied head is drawn under the embedding's name: both copies of a split pipeline start equal.
        """
        cfg = self.cfg
        self.init_buffers()
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scaled_init else cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                key = "tok_embeddings" if name == "output" and cfg.tie_embeddings else name
                self._draw(module.weight, key, seed, out_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (Router, GroupedExperts)):
                for part, weight in module.named_parameters(recurse=False):  # each stacked [E, ...] under its own name
                    if part.endswith("bias"):  # the router's and experts' biases (gpt-oss)
                        nn.init.zeros_(weight)
                    else:
                        self._draw(weight, f"{name}.{part}", seed, out_std)
                if getattr(module, "expert_bias", None) is not None:
                    nn.init.zeros_(module.expert_bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm, XIELU, HeadSinks)):
                module.reset_parameters()
            elif isinstance(module, TransformerBlock) and module.layer_scalar is not None:
                module.layer_scalar.fill_(1.0)
            elif isinstance(module, (GatedDeltaNet, Mamba2, ShortConv)):  # convolutions, decay (projections: Linear above)
                generator = torch.Generator(module.out_proj.weight.device)
                module.reset_parameters(generator.manual_seed(seed + zlib.crc32(name.encode())))

    def _draw(self, weight: torch.Tensor, key: str, seed: int, out_std: float) -> None:
        """Normal init of one weight from the generator of its name (see init_weights)."""
        cfg = self.cfg
        generator = torch.Generator(weight.device).manual_seed(seed + zlib.crc32(key.encode()))
        std = out_std if key.endswith(OUT_PROJECTIONS) else cfg.init_std
        std *= cfg.init_beta if key.endswith(DEEPNORM_SCALED) else 1.0
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The buffers derived from the config (RoPE tables, the sinusoid table, ALiBi slopes): all a model
        whose every weight is about to be loaded needs (build_model(init=False))."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, Attention) and module.alibi_slopes is not None:
                module.alibi_slopes.copy_(alibi_slopes(cfg.num_heads))
        # The local table (sliding layers) is unscaled: Gemma3 stretches only its full layers' context.
        for name, theta, scaling in (("global", cfg.rope_theta, cfg.rope_scaling), ("local", cfg.rope_local_theta, None)):
            cos_buffer = getattr(self, _rope_buffer(name, "cos"), None)
            if cos_buffer is not None:
                cos, sin = rope_tables(cfg.table_rope_dim(name), cfg.max_seq_len, theta, scaling, cos_buffer.device)
                cos_buffer.copy_(cos)
                getattr(self, _rope_buffer(name, "sin")).copy_(sin)
        if isinstance(self.pos_embeddings, SinusoidalPositions):
            self.pos_embeddings.table.copy_(sinusoid_table(cfg.max_seq_len + cfg.position_offset, cfg.hidden_size,
                                                           cfg.sinusoid))

    def attention_context(self, positions: Optional[torch.Tensor] = None, keys: KeyMask = NO_MASK,
                          cache: Optional[KVCache] = None) -> AttentionContext:
        """The context every attention layer of this forward shares: this model's RoPE tables and what the
        caller passed (see forward)."""
        rope = {n: (getattr(self, _rope_buffer(n, "cos")), getattr(self, _rope_buffer(n, "sin"))) for n in self.rope_names}
        return AttentionContext(rope=rope, positions=positions, keys=keys, cache=cache)

    def _embed(self, tokens: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        if self._sparse_embedding_grad():
            h = F.embedding(tokens, self.tok_embeddings.weight, sparse=True)
        else:
            h = self.tok_embeddings(tokens)  # [b, s, hidden]; through the module, where tp hooks in
        if self.cfg.embedding_multiplier != 1.0:
            h = h * self.cfg.embedding_multiplier
        if self.pos_embeddings is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
            h = h + self.pos_embeddings(positions + self.cfg.position_offset).to(h.dtype)
        return h if self.embedding_norm is None else self.embedding_norm(h)

    def forward(
        self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None, *, positions: Optional[torch.Tensor] = None,
        keys: KeyMask = NO_MASK, cache: Optional[KVCache] = None, token_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Training passes tokens (and labels) alone. Inference may pass the tokens' positions [b, s] (left
        padding), per-sequence key masks and a KV cache, which this forward fills and advances; positions
        default to the cache's continuation, else 0..s-1. The last pipeline stage of a model with multi-token
        prediction gets hidden states as `tokens` and the micro-batch's tokens [b, s] as `token_ids`, which the
        depths embed with that stage's copy of the embedding (parallel/pipeline.py)."""
        end = tokens.shape[1] + getattr(cache, "length", 0)  # what a uniform KV cache already holds
        if self.tok_embeddings is not None and end > self.cfg.max_seq_len:
            raise ValueError(f"an input of {end} positions exceeds the model's context of {self.cfg.max_seq_len} "
                             "(model.max_seq_len): shorten it")
        if positions is None and cache is not None and cache.length:
            positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=tokens.device)
        # a later pipeline stage gets hidden states [b, s, hidden] already
        h = tokens if self.tok_embeddings is None or token_ids is not None else self._embed(tokens, positions)
        ctx = self.attention_context(positions, keys, cache)
        for layer in self.layers.values():
            h = layer(h, ctx)
        if cache is not None:
            cache.advance(tokens.shape[1])
        h = h if self.norm is None else self.norm(h)
        if self.output is None:
            return h
        if self.mtp is not None and self.training and cache is None:  # leaves its logits on self.mtp
            self.mtp(h, tokens if token_ids is None else token_ids, positions, ctx, self._embed, self._head)
        logits = self._head(h)
        return logits if labels is None else token_cross_entropy(logits, labels)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last blocks' hidden states [b, s, hidden] through the final norm and the head: logits [b, s, vocab]
        (also the logit lens's view of any layer)."""
        return self._head(h if self.norm is None else self.norm(h))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [b, s, hidden] -> logits [b, s, vocab]: the output head shared by the
        main prediction and every multi-token prediction depth."""
        logits = self.output(h)  # [b, s, vocab], or scores [b, s, 1]
        if self.cfg.head == "score":  # the multiplier and soft-cap shape a distribution over the vocabulary only
            return logits
        if self.cfg.logit_multiplier != 1.0:
            logits = logits * self.cfg.logit_multiplier
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits


OUT_PROJECTIONS = ("attention.wo", "attention.out_proj", "feed_forward.w2", "experts.w2")  # write into the residual stream
DEEPNORM_SCALED = ("attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                   "experts.w1", "experts.w2", "experts.w3")


def _rope_buffer(table: str, part: str) -> str:
    """rope_cos / rope_sin for the global table, rope_local_cos / rope_local_sin for the local one."""
    return f"rope_{part}" if table == "global" else f"rope_{table}_{part}"


class NormHead(nn.Linear):
    """Baichuan2's output head: each vocabulary row of the weight is L2-normalised before the matmul
    (rows are local under a vocabulary-parallel split, so tensor parallelism needs nothing more)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1), self.bias)


class SinusoidalPositions(nn.Module):
    """Fixed absolute positions: a lookup into sinusoid_table, a buffer derived from the config (no parameters,
    kept out of checkpoints; filled by init_buffers)."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", torch.empty(max_seq_len, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.table)  # [..., dim]; a lookup DTensor shards like the learned one


def sinusoid_table(max_seq_len: int, dim: int, kind: str = "vaswani") -> torch.Tensor:
    """Absolute positions [max_seq_len, dim]: Vaswani et al.'s, sin on even and cos on odd dimensions, or
    tensor2tensor's (fairseq, XGLM), the sines of all frequencies then their cosines, the lowest 10000^-1 exactly,
    or Vaswani's frequencies in tensor2tensor's blocks (vaswani_blocked: CTRL)."""
    if kind == "tensor2tensor":  # as fairseq computes it, so that the table is the same to the last bit
        inv_freq = torch.exp(torch.arange(dim // 2).float() * -(math.log(10000) / (dim // 2 - 1)))
    else:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # [s, dim/2]
    if kind == "vaswani":
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32; tokens whose label is negative get 0.

    Returned unreduced so the caller can sum per data channel and divide by a token count it chose.
    Labels are the next tokens, already shifted (unlike Hugging Face's loss, which shifts inside).
    """
    labels = torch.where(labels < 0, -100, labels)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return loss.view(labels.shape)


def _table(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left unset: init_weights sets every weight. nn.Embedding's own N(0, 1) init, run on
    the meta device where models are built, imports torch._dynamo (~1 s), which inference never needs."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model on the meta device, its parameters in `dtype`: every name, shape and dtype, nothing allocated."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype != torch.float32:
        model.to(dtype)
    return model


def build_model(cfg: ModelConfig, device: Union[torch.device, str], seed: Optional[int] = None,
                init: bool = True, dtype: torch.dtype = torch.float32) -> Transformer:
    """Builds on the meta device, allocates once on `device` (parameters in `dtype`), then initialises (seeded
    when asked). With init=False the weights stay uninitialised memory, for a loader that writes every one."""
    model = meta_model(cfg, dtype)
    model.to_empty(device=device)
    model.tie_weights()
    if init:
        model.init_weights(seed if seed is not None else int(torch.randint(2**31, ())))
    else:
        model.init_buffers()
    return model


def count_params(cfg: ModelConfig, include_embedding: bool = True, active: bool = False) -> int:
    """Parameters of the model `cfg` builds, from a meta-device model (nothing allocated), so that every
    module counts as it is built. A tied head counts once; without the embedding, the lookups (token and
    learned positions) are left out and the head stays. `active`: the parameters one token passes through,
    each layer's routed experts counting top_k of their E (the router and shared experts whole)."""
    model = meta_model(cfg)
    lookups = ("tok_embeddings.weight", "pos_embeddings.weight")
    share = {id(p): cfg.moe_top_k / cfg.moe_experts for m in model.modules() if isinstance(m, GroupedExperts)
             for p in m.parameters()} if active else {}
    return round(sum(p.numel() * share.get(id(p), 1) for name, p in model.named_parameters()
                     if include_embedding or name not in lookups))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the forward and backward matmuls, with N the
    active non-embedding parameters (a mixture of experts' top_k experts, as Megatron's MFU counts them) plus
    the output head (a lookup costs nothing, the head is a matmul even when tied), plus 6 * layers * heads *
    (query-key + value width) * seq_len for the attention scores and values (12 * ... * head_dim where the
    widths are equal), each layer at its own width. The causal mask is not discounted, as in PaLM and Megatron's MFU. Multi-token prediction
    depths count as layers (their blocks are among the parameters), and each runs the shared head once more.
    Linear-attention and Mamba-2 layers have no scores: their recurrent state's products count instead, per token."""
    n = count_params(cfg, include_embedding=False, active=True)
    n += cfg.head_vocab_size * cfg.hidden_size * (int(cfg.tie_embeddings) + cfg.mtp_layers)
    specs = [cfg.layer(i) for i in range(cfg.num_layers)] + [cfg.layer(cfg.num_layers - 1)] * cfg.mtp_layers
    # A linear-attention layer's state [d_k, d_v] per value head (a Mamba-2 layer's [N, head_dim] per head) is read,
    # corrected or decayed, and written once per token (three products, 2 FLOPs each, forward and backward): no
    # seq_len term.
    per_token = {
        "linear": 18.0 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim,
        "mamba": 18.0 * cfg.mamba_num_heads * cfg.mamba_state_size * cfg.mamba_head_dim,
        "short_conv": 0.0,  # the convolution's taps: a few multiply-adds per channel, not counted
    }

    def scores(spec) -> float:  # query-key + value widths of this layer's heads (Gemma 4's full layers are wider)
        d = spec.head_dim or cfg.head_dim
        return 6.0 * cfg.num_heads * (d + (cfg.mla_v_head_dim if cfg.attention == "mla" else d)) * seq_len

    mixers = [spec for spec in specs if spec.sublayers != "ffn"]  # a feed_forward alone has no scores nor state
    return 6.0 * n + sum(scores(spec) if spec.mixer == "attention" else per_token[spec.mixer] for spec in mixers)
