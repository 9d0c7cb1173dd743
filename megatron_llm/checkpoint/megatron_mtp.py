"""Multi-token prediction (model/mtp.py) in megatron-core's names: MultiTokenPredictionBlock `mtp.layers.{k}`, each
an enorm, hnorm, eh_proj, a transformer_layer named as a decoder layer is, and a final_layernorm. The block lives on
the last pipeline stage, its layers numbered 0..D-1 there. eh_proj is a ColumnParallelLinear with gather_output
False (megatron-core gathers its output after), so tensor parallelism splits its rows.

megatron-core's last stage also keeps its own copy of the embedding for the MTP when pipelining (GPTModel builds
`embedding` where mtp_process): we do not write or read that file layout yet, so the converter refuses an MTP model
at --pp > 1. (Training at parallel.pp > 1 holds the same copy, parallel/pipeline.py, and its native checkpoints are
layout-free: convert one at --pp 1.)
"""

from __future__ import annotations

from megatron_llm.errors import UsageError

DECODER, MTP = "decoder.layers.{i}.", "mtp.layers.{i}.transformer_layer."


def mtp_templates(decoder: list[tuple[str, tuple[str, ...], str]], replicated: str, column: str):
    """(megatron-core name, native sources, tp kind) of every MTP tensor, `{i}` the depth: its own four modules,
    then each decoder-layer template moved under transformer_layer (our `mtp.layers.{i}.block`)."""
    own = [(f"mtp.layers.{{i}}.{theirs}.{part}", (f"mtp.layers.{{i}}.{ours}.{part}",), kind)
           for theirs, ours, kind, parts in (
               ("enorm", "enorm", replicated, ("weight", "bias")), ("hnorm", "hnorm", replicated, ("weight", "bias")),
               ("eh_proj", "eh_proj", column, ("weight",)), ("final_layernorm", "norm", replicated, ("weight", "bias")))
           for part in parts]
    layer = [(name.replace(DECODER, MTP), tuple(s.replace("layers.{i}.", "mtp.layers.{i}.block.") for s in sources), kind)
             for name, sources, kind in decoder if name.startswith(DECODER)]
    return own + layer


def mtp_depths(shapes: dict) -> int:
    """D, from the native tensors: each depth has one eh_proj."""
    return sum(name.startswith("mtp.layers.") and name.endswith(".eh_proj.weight") for name in shapes)


def check_mtp_layout(mtp_layers: int, pp: int) -> None:
    if mtp_layers and pp > 1:
        raise UsageError(f"--pp {pp}: megatron-core keeps a second embedding on the last stage for multi-token "
                         "prediction, a layout we do not write or read yet; use --pp 1 (model.mtp_layers > 0)")
