"""Every Hugging Face family we read and write, by model_type: one declarative table each (table.py
says what a table holds). A family is added by writing its table and listing it here."""

from megatron_llm.checkpoint.families import (dbrx, deepseek, dense, fused, gpt, gpt_oss, hybrid, latent, layernorm, llama, llama4, moe,
                                              mrope, remote, sigmoid_moe, ssm, windowed_moe)
from megatron_llm.checkpoint.families.table import Family
from megatron_llm.errors import UsageError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (*llama.FAMILIES, *fused.FAMILIES, *dense.FAMILIES, *remote.FAMILIES,
                                                *gpt.FAMILIES, *layernorm.FAMILIES, *moe.FAMILIES, *deepseek.FAMILIES,
                                                *dbrx.FAMILIES, *gpt_oss.FAMILIES, *llama4.FAMILIES, *mrope.FAMILIES,
                                                *sigmoid_moe.FAMILIES, *latent.FAMILIES, *windowed_moe.FAMILIES,
                                                *hybrid.FAMILIES, *ssm.FAMILIES)}


# model_types transformers builds whose models the menu cannot express, each with the reason a user is told.
NOT_READ = {
    "longcat_flash": "LongCat-Flash's block holds two attention and two MLP sublayers with a mixture of experts on a "
                     "shortcut beside them (fed the first MLP's input, added after the second), zero-computation "
                     "(identity) experts among the routed ones, and latent attention that scales the queries and the "
                     "key latent by sqrt(hidden_size / rank); the model menu has none of these",
    "modernbert-decoder": "ModernBERT's decoder puts a prediction head (a dense layer, its activation and a LayerNorm) "
                          "between the final norm and the vocabulary projection, and its first layer has no attention "
                          "norm (the embedding's norm serves it); the model menu has neither",
}


def family(model_type: str) -> Family:
    if model_type in NOT_READ:
        raise UsageError(f"model_type {model_type!r} is not supported: {NOT_READ[model_type]}")
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
