"""Gemma 4's language model (gemma4_text: Gemma4ForCausalLM; gemma4_unified_text: Gemma4UnifiedForCausalLM, the same
decoder without the per-layer inputs and experts), written as a difference from Gemma 3 (llama.py's GEMMA2_CONFIG and
SANDWICH_TENSORS): the same sandwich block, scaled embeddings, GeGLU and sliding layers with a RoPE base of their own,
but plain norm weights (w, not 1 + w), scores unscaled (q and k are normed per head), the values normed per head without
a weight (model.v_norm), a stored scalar times each block's output (model.layer_scalar), and full layers of their own
shape: global_head_dim wide heads (model.full_head_dim), rotated by proportional RoPE (the first quarter of the whole
head's frequencies), and with attention_k_eq_v no value projection (the keys' serve; model.full_values_from_keys) and
num_global_key_value_heads (model.full_kv_heads).

transformers 5 saves the full layers' shape as per_layer_config ({layer: {head_dim, num_key_value_heads}}); the
published config.json has global_head_dim and num_global_key_value_heads, which export writes. What the menu has not
is refused by its key before any tensor is read: per-layer input embeddings (E2B, E4B), keys and values shared across
layers (E2B, E4B), the dense MLP beside a mixture of experts (26B-A4B), bidirectional attention.
"""

from megatron_llm.checkpoint.families.common import LAYERS, ROPE, without, write_every_layer_type
from megatron_llm.checkpoint.families.llama import GEMMA2_CONFIG, SANDWICH_TENSORS
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

# Gemma4TextConfig's fill for a missing rope_parameters
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
GLOBAL_HEAD_DIM = 512  # the config classes' global_head_dim

# key -> (the value the menu can read, what the key turns on), checked in this order
BEYOND_MENU = {
    "hidden_size_per_layer_input": (0, "per-layer input embeddings (embed_tokens_per_layer, per_layer_model_projection "
                                       "and a gated per-layer input after every block)"),
    "num_kv_shared_layers": (0, "its last layers reusing the keys and values of an earlier layer of their type"),
    "enable_moe_block": (False, "a mixture of experts beside the dense MLP in every block, with norms and a router "
                                "of their own"),
    "use_bidirectional_attention": (None, "bidirectional attention over all tokens"),
}


def _refuse_beyond_menu(hf: dict, ple_default: int) -> None:
    filled = {"hidden_size_per_layer_input": ple_default}  # the config class's fill where config.json lacks the key
    for key, (fits, what) in BEYOND_MENU.items():
        value = hf.get(key, filled.get(key, fits))
        if value != fits and not (key == "use_bidirectional_attention" and value == "vision"):  # vision: images only
            raise UsageError(f"config.json {key} {value!r}: Gemma 4's {what}, which the model menu has not; "
                             f"only checkpoints with {key} {fits!r} are read")


def _layer_types(hf: dict) -> list[str]:
    """layer_types, or the config class's pattern (every 6th layer full); the last layer is always full."""
    types = list(hf.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                           for i in range(hf["num_hidden_layers"])])
    return types[:-1] + ["full_attention"]


def _full_layers(hf: dict, head_dim: int, kv: int) -> tuple[int, int]:
    """The full layers' head width and key/value heads: per_layer_config (transformers 5's save) or the published
    global_head_dim and num_global_key_value_heads (the latter only with attention_k_eq_v, as transformers reads it)."""
    overrides = hf.get("per_layer_config")
    if overrides is None:
        k_eq_v = bool(hf.get("attention_k_eq_v", False))
        return hf.get("global_head_dim", GLOBAL_HEAD_DIM), (hf.get("num_global_key_value_heads") if k_eq_v else None) or kv
    full = {str(i) for i, kind in enumerate(_layer_types(hf)) if kind == "full_attention"}
    shapes = [dict(overrides[i]) for i in sorted(overrides)]
    if set(overrides) != full or any(s != shapes[0] for s in shapes) or set(shapes[0]) - {"head_dim", "num_key_value_heads"}:
        raise UsageError(f"config.json per_layer_config {overrides} is not one head_dim (and num_key_value_heads) for "
                         "every full-attention layer, the only per-layer shape the model menu has")
    return shapes[0].get("head_dim", head_dim), shapes[0].get("num_key_value_heads", kv)


def _reader(ple_default: int, window: int):
    def read(hf: dict) -> dict:
        _refuse_beyond_menu(hf, ple_default)
        types = _layer_types(hf)
        out = {**LAYERS.read({**hf, "sliding_window": hf.get("sliding_window", window), "layer_types": types}),
               **ROPE.read({**hf, "rope_parameters": hf.get("rope_parameters") or DEFAULT_ROPE})}
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        full_head_dim, full_kv = _full_layers(hf, head_dim, kv)
        return {**out, "full_head_dim": None if full_head_dim == head_dim else full_head_dim,  # None: as the others
                "full_kv_heads": None if full_kv == kv else full_kv,
                "full_values_from_keys": bool(hf.get("attention_k_eq_v", False))}
    return read


def _write(cfg: ModelConfig) -> dict:
    kv = cfg.full_kv_heads if cfg.full_values_from_keys else None  # transformers reads it only with attention_k_eq_v
    return {**write_every_layer_type(cfg), **ROPE.write(cfg), "global_head_dim": cfg.full_head_dim or cfg.head_dim,
            "attention_k_eq_v": cfg.full_values_from_keys, "num_global_key_value_heads": kv or cfg.num_kv_heads}


GEMMA4_CONFIG = (
    *(e for e in without(GEMMA2_CONFIG, "attention_scale", "attn_softcap", "norm_unit_offset") if e not in (LAYERS, ROPE)),
    Fixed("attention_scale", 1.0), Fixed("qk_norm", True), Fixed("v_norm", True), Fixed("layer_scalar", True),
)
GEMMA4_TENSORS = {**SANDWICH_TENSORS, "model.layers.{i}.layer_scalar": "layers.{i}.layer_scalar"}
# the keys of BEYOND_MENU at the values read (transformers' defaults would turn the first two on)
GEMMA4_TEXT = Family("gemma4_text", "Gemma4ForCausalLM", (*GEMMA4_CONFIG, Derived(_reader(256, 512), _write)),
                     GEMMA4_TENSORS, extra={"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
                                            "enable_moe_block": False})
GEMMA4_UNIFIED_TEXT = Family("gemma4_unified_text", "Gemma4UnifiedForCausalLM",
                             (*GEMMA4_CONFIG, Derived(_reader(0, 1024), _write)), GEMMA4_TENSORS,
                             extra={"num_kv_shared_layers": 0})

FAMILIES = (GEMMA4_TEXT, GEMMA4_UNIFIED_TEXT)
