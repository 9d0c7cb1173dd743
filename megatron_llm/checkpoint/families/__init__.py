"""Every Hugging Face family we read and write, by model_type: one declarative table each (table.py
says what a table holds). A family is added by writing its table and listing it here."""

from megatron_llm.checkpoint.families import (ctrl, dbrx, deepseek, dense, fused, gemma, gpt, gpt_oss, hybrid, latent, layernorm, llama, llama4, moe,
                                              mrope, remote, sigmoid_moe, ssm, windowed_moe)
from megatron_llm.checkpoint.families.table import Family
from megatron_llm.errors import UsageError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (*llama.FAMILIES, *fused.FAMILIES, *dense.FAMILIES, *remote.FAMILIES,
                                                *gpt.FAMILIES, *layernorm.FAMILIES, *moe.FAMILIES, *deepseek.FAMILIES,
                                                *dbrx.FAMILIES, *gpt_oss.FAMILIES, *llama4.FAMILIES, *mrope.FAMILIES,
                                                *sigmoid_moe.FAMILIES, *latent.FAMILIES, *windowed_moe.FAMILIES,
                                                *hybrid.FAMILIES, *ssm.FAMILIES, *gemma.FAMILIES, *ctrl.FAMILIES)}


# model_types transformers builds whose models the menu cannot express, each with the reason a user is told.
NOT_READ = {
    "falcon_h1": "Falcon-H1's layers run attention and a Mamba-2 mixer side by side on one norm (their outputs scaled "
                 "and summed) with muP multipliers on the Mamba-2 projection's parts (mup_vector, ssm_in/out, "
                 "attention_in/out, key and MLP gate/down multipliers); the model menu has a single mixer per layer "
                 "and none of these multipliers",
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
    # decoder-only causal LMs transformers 5.24 builds, read from their modeling files
    "diffllama": "DiffLlama's differential attention takes two softmax maps per head pair (head h and head h + "
                 "num_heads/2 share a query/key split, the values' two halves are attended separately), subtracts the "
                 "second times a learned lambda (exp(lambda_q1.lambda_k1) - exp(lambda_q2.lambda_k2) + lambda_init(layer)) "
                 "and normalises each pair's output (a weightless RMSNorm times 1 - lambda_init); the model menu has "
                 "one softmax per head",
    "bitnet": "BitNet b1.58 normalises the attention output before o_proj (attn_sub_norm) and the gated MLP's product "
              "before down_proj (ffn_sub_norm), and its published weights are ternary, packed with a weight_scale "
              "(quantization_config bitnet), its activations quantised to 8 bits each forward; the model menu has no "
              "sub-norms and no ternary or 8-bit linear layers",
    "doge": "Doge masks its attention dynamically (a per-key-head bias exp(A * softplus(dt_proj(values))) added to "
            "the scores, its top keep_window_size keys kept), scales each residual by a learned vector "
            "(input_residual, post_attention_residual) and its cross-domain MoE retrieves experts that are embedding "
            "rows by product keys; the model menu has none of these",
    "jetmoe": "JetMoE's attention is a mixture of attention heads: a router picks top-k experts, each with its own "
              "query and output projections over shared keys and values (kv_proj), plus a bias after them; the model "
              "menu has one set of query and output projections per layer",
    "dory": "Dory (nGPT) keeps every hidden state on the unit sphere: its norms are L2 projections without weights, "
            "each residual moves towards the normalised update at a learned per-channel rate (lambda_1, lambda_2), "
            "queries, gates, MLP branches and logits carry learned scales (sqk, s_gate, suv, logit_scale) and its "
            "middle layers loop; the model menu has none of these",
    "hrm_text": "HRM-Text runs two stacks of layers (H and L, each ending in a weightless norm) in nested cycles, "
                "H_cycles times L_cycles, feeding each the other's state plus a learned initial state (z_L_init) and "
                "back-propagating through the last cycles only; the model menu has one pass through one stack",
    "zaya": "ZAYA1's compressed convolutional attention mixes queries and keys by two causal convolutions with "
            "residual paths and takes half its values from the previous token (v_proj_delayed), its residual adds "
            "carry learned scales and biases, and its router is an MLP with a skip expert and a state carried "
            "between layers; the model menu has none of these",
    "inkling_text": "Inkling's attention adds a learned relative-position bias (per-head relative states from r_proj "
                    "times a [d_rel, rel_extent] table), runs short causal convolutions over keys, values and both "
                    "sublayers' outputs, its sliding layers have their own head counts and its router scores the "
                    "shared experts beside the routed ones (a sink); the model menu has none of these",
    "inkling2_text": "Inkling 2 adds to Inkling's relative-position bias and short convolutions attention over earlier "
                     "blocks' states in the residual stream (block attention residuals), L2-clipped heads, "
                     "dynamic short convolutions, a gated output projection and a soft-capped SwiGLU; the model "
                     "menu has none of these",
    "inkling2_loop_text": "Inkling 2 Loop is Inkling 2 (relative-position bias, short convolutions, block attention "
                          "residuals) whose middle layers loop, mixing messages from the previous loop into their "
                          "queries, keys, values and MLP through tanh gates; the model menu has none of these",
    "gpt_neox_japanese": "GPT-NeoX-Japanese adds a bias to the attention output of its last layer only (dense_bias); "
                         "the model menu has out_bias on every layer or none",
    "blt": "BLT (Byte Latent Transformer) reads bytes: a local encoder and decoder with cross-attention to entropy- "
           "patched latent tokens of a global transformer, and hash n-gram embeddings; the model menu has one "
           "token-level decoder",
    "recurrent_gemma": "RecurrentGemma's blocks are mostly RG-LRU recurrences (a gated linear recurrence after a "
                       "short convolution, Griffin) with local attention between them; the model menu has no RG-LRU",
    "mllama": "Llama 3.2 Vision's language model interleaves gated cross-attention layers (cross_attention_layers) "
              "that attend to the image features; the model menu has no cross-attention",
    "mllama_text_model": "Llama 3.2 Vision's language model interleaves gated cross-attention layers "
                         "(cross_attention_layers) with its self-attention ones; the model menu has no cross-attention",
    "olmo_hybrid": "OLMo-Hybrid's Gated DeltaNet layers scale beta by 2 (linear_allow_neg_eigval), norm their gated "
                   "output with eps 1e-5 and sit in pre-norm blocks beside OLMo 3's output-norm attention blocks; the "
                   "model menu has beta in (0, 1), the gated norm at norm_eps and one norm placement for every layer",
    "bailing_hybrid": "Ling's hybrid layers are gated delta-rule linear attention with a per-channel forget gate (a "
                      "low-rank decay per key channel) beside latent attention with a head-wise output gate; the "
                      "model menu has linear attention decaying by one scalar per head",
    "kimi_linear": "Kimi Linear's KDA layers are gated delta-rule linear attention with a per-channel forget gate (a "
                   "low-rank decay per key channel) and its full layers NoPE latent attention; the model menu has "
                   "linear attention decaying by one scalar per head",
    "minimax": "MiniMax-Text-01's lightning attention (linear attention with a fixed per-head exponential decay and "
               "a gated norm) fills most layers, and every residual add takes alpha times the stream plus beta times "
               "the sublayer; the model menu has neither",
    "xlstm": "xLSTM's blocks are mLSTM cells (exponential input and forget gates over a matrix memory with a "
             "normaliser state); the model menu has no mLSTM",
    "rwkv": "RWKV's blocks mix time by a WKV recurrence with learned per-channel decay and token shift, and channels "
            "by a squared-ReLU MLP gated by a sigmoid receptance; the model menu has none of these",
    "cpmant": "CPM-Ant biases its attention scores by learned relative-position buckets and by segment pairs (a "
              "T5-style table per segment type, from the input's segment ids) and prefixes its input with prompt "
              "embeddings; the model menu has neither",
    "reformer": "Reformer attends by locality-sensitive hashing and local chunks, runs reversible residual layers "
                "(two streams) and embeds positions axially; the model menu has none of these",
}


def family(model_type: str) -> Family:
    if model_type in NOT_READ:
        raise UsageError(f"model_type {model_type!r} is not supported: {NOT_READ[model_type]}")
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
