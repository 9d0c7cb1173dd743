"""Every Hugging Face family we read and write, by model_type: one declarative table each (table.py
says what a table holds). A family is added by writing its table and listing it here."""

from megatron_llm.checkpoint.families import (dbrx, deepseek, dense, fused, gpt, gpt_oss, hybrid, latent, layernorm, llama, llama4, moe,
                                              mrope, remote, sigmoid_moe, windowed_moe)
from megatron_llm.checkpoint.families.table import Family
from megatron_llm.errors import UsageError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (*llama.FAMILIES, *fused.FAMILIES, *dense.FAMILIES, *remote.FAMILIES,
                                                *gpt.FAMILIES, *layernorm.FAMILIES, *moe.FAMILIES, *deepseek.FAMILIES,
                                                *dbrx.FAMILIES, *gpt_oss.FAMILIES, *llama4.FAMILIES, *mrope.FAMILIES,
                                                *sigmoid_moe.FAMILIES, *latent.FAMILIES, *windowed_moe.FAMILIES,
                                                *hybrid.FAMILIES)}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
