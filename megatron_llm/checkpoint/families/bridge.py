"""Rewriting a checkpoint as another family (trans_X_to_Y): the source's model, changed only in ways that
keep its function, so that the target family's table can hold it. Two such changes exist:
  - a bias the target always has (Qwen2's q/k/v, Llama's attention_bias covering o_proj) is added as zeros;
  - a normalised head (Baichuan2's NormHead) is folded: its rows are stored normalised, which is what the
    head multiplies by, so a plain head computes the same logits (bit for bit in fp32).
Anything else the target cannot express is refused by its table, naming the field.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

from megatron_llm.checkpoint.families import family
from megatron_llm.checkpoint.stream import Reader, native_shapes
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

BIASES = ("qkv_bias", "out_bias", "mlp_bias", "output_bias")  # added as zeros when the target needs them


def bridged_config(cfg: ModelConfig, model_type: str) -> ModelConfig:
    """The first config `model_type` accepts among `cfg` with some biases added and the head folded;
    refuses with the target's own message for `cfg` itself when none fits."""
    target = family(model_type)
    absent = [name for name in BIASES if not getattr(cfg, name)]
    folds = [{}, {"norm_head": False}] if cfg.norm_head else [{}]
    for count in range(len(absent) + 1):
        for added, fold in itertools.product(itertools.combinations(absent, count), folds):
            candidate = dataclasses.replace(cfg, **dict.fromkeys(added, True), **fold)
            try:
                target.write_config(candidate)
            except UsageError:
                continue
            return candidate
    target.write_config(cfg)  # raises, naming what the target cannot express
    raise AssertionError("unreachable")


class BridgedReader:
    """`reader`'s tensors as the bridged model's: zeros for the added biases, the head's rows normalised."""

    def __init__(self, reader: Reader, cfg: ModelConfig):
        self.reader, self.config = reader, cfg
        self.hf_config, self.directory = reader.hf_config, reader.directory
        self.source_names = set(native_shapes(reader.config))
        self.shapes = native_shapes(cfg)
        self.fold_head = reader.config.norm_head and not cfg.norm_head

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        present = [name for name in names if name in self.source_names]
        out = self.reader.read(present)
        dtype = next(iter(out.values())).dtype if out else torch.float32
        for name in names:
            if name not in out:
                out[name] = torch.zeros(self.shapes[name], dtype=dtype)
        if self.fold_head and "output.weight" in out:
            out["output.weight"] = F.normalize(out["output.weight"].float(), dim=-1).to(dtype)
        return out
