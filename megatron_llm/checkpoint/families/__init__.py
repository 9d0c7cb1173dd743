"""Every Hugging Face family we read and write, by model_type: one declarative table each (table.py
says what a table holds). A family is added by writing its table and listing it here."""

from megatron_llm.checkpoint.families import (dbrx, deepseek, dense, fused, gemma, gpt, gpt_oss, hybrid, latent, layernorm, llama, llama4, moe,
                                              mrope, remote, sigmoid_moe, ssm, windowed_moe)
from megatron_llm.checkpoint.families.table import Family
from megatron_llm.errors import UsageError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (*llama.FAMILIES, *fused.FAMILIES, *dense.FAMILIES, *remote.FAMILIES,
                                                *gpt.FAMILIES, *layernorm.FAMILIES, *moe.FAMILIES, *deepseek.FAMILIES,
                                                *dbrx.FAMILIES, *gpt_oss.FAMILIES, *llama4.FAMILIES, *mrope.FAMILIES,
                                                *sigmoid_moe.FAMILIES, *latent.FAMILIES, *windowed_moe.FAMILIES,
                                                *hybrid.FAMILIES, *ssm.FAMILIES, *gemma.FAMILIES)}


# model_types transformers builds whose models the menu cannot express, each with the reason a user is told.
NOT_READ = {
    "longcat_flash": "LongCat-Flash's block holds two attention and two MLP sublayers with a mixture of experts on a "
                     "shortcut beside them (fed the first MLP's input, added after the second), zero-computation "
                     "(identity) experts among the routed ones, and latent attention that scales the queries and the "
                     "key latent by sqrt(hidden_size / rank); the model menu has none of these",
    "gemma3n_text": "Gemma 3n carries altup_num_inputs copies of the hidden state through every block (AltUp's "
                    "predict and correct steps), a low-rank learned residual beside attention (Laurel), per-layer input "
                    "embeddings, keys and values shared by its last layers and a Gaussian top-k sparsity on the MLP "
                    "activations of its first layers; the model menu has none of these",
    "gemma3n": "Gemma 3n's multimodal checkpoint holds a gemma3n_text language model, which carries altup_num_inputs "
               "copies of the hidden state through every block (AltUp), a low-rank learned residual (Laurel), per-layer "
               "input embeddings and keys and values shared by its last layers; the model menu has none of these",
    "modernbert-decoder": "ModernBERT's decoder puts a prediction head (a dense layer, its activation and a LayerNorm) "
                          "between the final norm and the vocabulary projection, and its first layer has no attention "
                          "norm (the embedding's norm serves it); the model menu has neither",
    "mimo_v2_flash": "MiMo-V2-Flash's values are narrower than its queries and keys (v_head_dim) and scaled by "
                     "attention_value_scale, and its sliding layers have twice the full layers' key/value heads and "
                     "attention sinks the full layers lack; the model menu has one value width, no value scale and "
                     "sinks on every layer or none",
    "beam": "Beam scales each residual add by its depth (the n-th add takes the sublayer's output times 1/sqrt(n) and "
            "the stream times sqrt((n - 1)/n)), multiplies its NoPE layers' queries by (1 + (position + 1)/2048)^0.1 "
            "and adds a per-head bias to its sigmoid output gate; the model menu has none of these",
    # DeepSeek Sparse Attention's relatives (deepseek_v32 and glm_moe_dsa read, families/deepseek.py)
    "axk2": "A.X-K2's input norms are gated RMSNorms (a low-rank sigmoid gate on the normalised state), its latent "
            "attention's output is gated by a sigmoid from a fused query projection, and its grouped router fills the "
            "dropped groups' scores with 0 rather than -inf; the model menu has none of these",
    "dots3_note_text": "dots.3-note's sliding layers are latent attention of their own shape and RoPE base (per-layer "
                       "qk_rope_head_dim and theta), its keys' RoPE part has its own norm and its attention an output "
                       "gate (g_proj); the model menu has one latent shape and base for every layer and neither",
    "hy_v4": "HunYuan-V4 carries hc_mult copies of the hidden state through every block (hyper-connections), adds "
             "attention sinks and a clamped SwiGLU to its sparse attention, and its 'shared' indexer layers reuse an "
             "earlier layer's top-k; the model menu has no hyper-connections and each layer selects its own keys",
    "minimax_m3_vl_text": "MiniMax-M3's indexer selects blocks of index_block_size keys (index_topk_blocks of them, "
                          "plus index_local_blocks recent ones), not single keys; the sparse attention here ranks "
                          "keys one by one",
    "qwen4_exp_text": "Qwen4-Exp's sparse attention indexes compressed key blocks (indexer_compress_ratio, a budget and "
                      "key heads of its own), and its blocks carry hyper-connections, per-layer and n-gram embeddings; "
                      "the model menu has none of these",
    "phimoe": "Phi-3.5-MoE's sparsemixer router weighs each of its two picks by a softmax over only the experts whose "
              "logits lie within 2 x router_jitter_noise (relative) of that pick's, and in training samples the picks "
              "(Gumbel) with a Heun's-method gradient; the router menu has softmax or sigmoid top-k scores, "
              "renormalised or not, chosen and trained deterministically",
}


def family(model_type: str) -> Family:
    if model_type in NOT_READ:
        raise UsageError(f"model_type {model_type!r} is not supported: {NOT_READ[model_type]}")
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
