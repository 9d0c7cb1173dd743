"""Conversion between Hugging Face, Megatron-LM and native checkpoints, in any direction, and loading
any of the three as a model. tools/convert_checkpoint.py is the command line over convert().

Every pair goes through the same loop (stream.stream): the reader of the input format hands our
native tensors group by group to the writer of the output format, so megatron -> megatron with another
tp/pp (resharding) is simply a Megatron reader feeding a Megatron writer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_llm.checkpoint.families.bridge import BridgedReader, bridged_config
from megatron_llm.checkpoint.families.multimodal import WRAPPERS
from megatron_llm.checkpoint.hf_io import INDEX, SINGLE, HFReader, HFWriter
from megatron_llm.checkpoint.megatron import SPECS
from megatron_llm.checkpoint.megatron_io import TRACKER, MegatronReader, MegatronWriter
from megatron_llm.checkpoint.hf import TOKEN_KEYS
from megatron_llm.checkpoint.native import read_config, resolve_checkpoint
from megatron_llm.checkpoint.native_io import NativeReader, NativeWriter
from megatron_llm.checkpoint.stream import (
    DTYPES,
    HF_CONFIG,
    Reader,
    Writer,
    atomic_directory,
    directory_bytes,
    native_groups,
    native_shapes,
    stream,
)
from megatron_llm.config import ModelConfig
from megatron_llm.model import build_model
from megatron_llm.data.tokenizer import ByteTokenizer
from megatron_llm.errors import UsageError
from megatron_llm.paths import writable_directory

FORMATS = ("hf", "megatron", "native")
READERS = {"hf": HFReader, "megatron": MegatronReader, "native": NativeReader}
# Copied through unchanged from the input directory, whatever the formats: a model keeps its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
# Copied too from the multimodal checkpoint of --vision-from: its processor's image and video settings.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


@dataclass
class Options:
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel size of a Megatron output (mixture-of-experts models)
    etp: Optional[int] = None  # its experts' tensor-parallel size, dividing tp (1: experts whole); None: tp
    spec: str = "local"  # Megatron key names: megatron-core's local spec or the Transformer Engine spec
    dtype: Optional[str] = None  # fp32, bf16 or fp16; None keeps the input's (with vision_from, that checkpoint's)
    hf_family: Optional[str] = None  # None: the input's own family when known, else the plainest that fits
    # a multimodal Hugging Face checkpoint (a wrapper in families/multimodal.py) that the output copies, with our model
    # as its language model: how a language model fine-tuned from it goes back to serving images
    vision_from: Optional[str] = None
    max_shard_bytes: int = 5 * 1024**3  # Hugging Face output: bytes per safetensors shard, at most (as transformers)
    overwrite: bool = False


@dataclass
class Summary:
    direction: str
    parameters: int
    files: int
    bytes: int
    seconds: float
    output: Path

    def __str__(self) -> str:
        return (f"converted {self.direction}: {_si(self.parameters)} parameters, {self.files} weight files, "
                f"{_si(self.bytes)}B in {self.seconds:.1f} s -> {self.output}")


def _si(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if n < 999.5 or unit == "T":  # what .3g would print as 1e+03
            return f"{n:.3g} {unit}".rstrip()
        n /= 1000


def detect_format(path: str) -> str:
    p = Path(path)
    if (p / TRACKER).is_file():
        return "megatron"
    if (p / "config.json").is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file()):
        return "hf"
    if (p / ".metadata").is_file() or (p / "latest").is_file():
        return "native"
    raise UsageError(
        f"{path} is not a checkpoint we know: expected a Hugging Face directory (config.json + safetensors), "
        f"a Megatron-LM one ({TRACKER}) or a native one (.metadata or latest)"
    )


def open_reader(fmt: str, path: Path) -> Reader:
    if not Path(path).is_dir():
        raise UsageError(f"input {path} is not a directory")
    return READERS[fmt](Path(path))


def _open_writer(fmt: str, path: Path, reader: Reader, opts: Options, dtype: torch.dtype,
                 into: Optional[HFReader]) -> Writer:
    cfg = reader.config
    if fmt == "megatron":
        return MegatronWriter(path, cfg, opts.tp, opts.pp, opts.spec, dtype, opts.ep, opts.etp)
    if ((opts.tp, opts.pp, opts.ep) != (1, 1, 1) or opts.etp is not None) and fmt == "hf":
        raise UsageError("--tp/--pp/--ep/--etp set a Megatron layout; Hugging Face checkpoints are unsharded: drop them")
    if fmt == "hf":
        return HFWriter(path, cfg, dtype, reader.hf_config, opts.hf_family, opts.max_shard_bytes, into)
    return NativeWriter(path, cfg)


def _first_dtype(reader: Reader) -> torch.dtype:
    """The input's dtype, from layer 0's first tensor (a norm weight: cheap to read, then dropped)."""
    first = native_groups(reader.config)[1][0]
    return reader.read([first])[first].dtype


def convert(input: str, input_format: str, output: str, output_format: str, opts: Optional[Options] = None) -> Summary:
    """Converts a checkpoint; the output directory appears complete or not at all."""
    opts = opts or Options()
    for fmt in (input_format, output_format):
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opts.spec not in SPECS:
        raise UsageError(f"unknown --megatron-spec {opts.spec!r}; choose one of {', '.join(SPECS)}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    sizes = {"--tp": opts.tp, "--pp": opts.pp, "--ep": opts.ep, "--etp": 1 if opts.etp is None else opts.etp}
    for flag, size in sizes.items():
        if size < 1:
            raise UsageError(f"{flag} must be a positive number of ranks, got {size}")
    src, dst = Path(input).resolve(), Path(output).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise UsageError(f"--output {output} overlaps the input {input}; choose a directory outside it")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--output {output} is a file: a checkpoint is a directory; choose another --output")
    start = time.perf_counter()
    into = _multimodal_target(opts, output_format, dst)
    reader = open_reader(input_format, src)
    if input_format == "native" and reader.hf_config is None:  # a model trained here: nothing to inherit ids from
        reader.hf_config = byte_token_ids(src, reader.config)
    target = into.family.model_type if into else opts.hf_family
    if output_format == "hf" and target is not None:  # trans_X_to_Y: the target family's form of the model
        bridged = bridged_config(reader.config, target)
        reader = reader if bridged == reader.config else BridgedReader(reader, bridged)
    if into:
        _check_fits(reader.config, into)
    writable_directory(str(dst.parent), "the directory of --output")  # now, not after the conversion's work
    dtype = DTYPES[opts.dtype] if opts.dtype else _first_dtype(into or reader)  # into a checkpoint: as it stores it
    label = f"{input_format} -> {output_format}"
    try:
        with atomic_directory(dst, opts.overwrite) as tmp:
            writer = _open_writer(output_format, tmp, reader, opts, dtype, into)
            totals = stream(reader, writer, dtype, label)  # always cast: writers plan for one dtype
            files = writer.finish()
            _carry_files(reader, tmp, output_format, into)
    except OSError as e:  # a full disk, a read-only directory: the partial output is already gone
        raise UsageError(f"cannot write {output} ({e.strerror or e}); nothing was left behind: free space or choose another --output") from None
    if output_format == "megatron":
        experts = (f", ep={opts.ep}" if opts.ep > 1 else "") + (f", etp={opts.etp}" if opts.etp is not None else "")
        label += f" (tp={opts.tp}, pp={opts.pp}{experts}, {opts.spec} spec)"
    elif output_format == "native":
        label += " (layout-free: train.py loads it at any tp/pp)"
    elif into:
        label += f" (into {into.text.wrapper} {opts.vision_from}, its {into.text.left_out} vision/projector tensors copied)"
    return Summary(label, totals.parameters, files, directory_bytes(dst), time.perf_counter() - start, Path(output))


def _multimodal_target(opts: Options, output_format: str, dst: Path) -> Optional[HFReader]:
    """The multimodal checkpoint of --vision-from, checked against --output-family and --output-format; None
    without one. A wrapper's vision tower and projector are not ours to write, so a wrapper family needs it."""
    wrapper = opts.hf_family if opts.hf_family in WRAPPERS else None
    if opts.vision_from is None:
        if wrapper:
            raise UsageError(f"--output-family {wrapper} is a multimodal model whose vision tower and projector we do not "
                             f"hold: add --vision-from with the {wrapper} checkpoint to take them from")
        return None
    if output_format != "hf":
        raise UsageError(f"--vision-from writes a Hugging Face multimodal checkpoint, not {output_format}: use "
                         "--output-format hf or drop --vision-from")
    source = Path(opts.vision_from).resolve()
    if not source.is_dir():
        raise UsageError(f"--vision-from {opts.vision_from} is not a directory")
    if source == dst or source in dst.parents or dst in source.parents:
        raise UsageError(f"--output overlaps --vision-from {opts.vision_from}; choose a directory outside it")
    into = HFReader(source, quiet=True)
    model_type = into.config_json.get("model_type")
    if into.text.wrapper is None:
        raise UsageError(f"--vision-from {opts.vision_from} is a {model_type} checkpoint, not a multimodal one: give one "
                         f"of model_type {', '.join(sorted(WRAPPERS))}")
    if opts.hf_family not in (None, model_type):
        raise UsageError(f"--output-family {opts.hf_family} differs from --vision-from {opts.vision_from}'s model_type "
                         f"{model_type}: the output is that checkpoint's model; drop --output-family or give a "
                         f"{opts.hf_family} checkpoint")
    return into


def _check_fits(cfg: ModelConfig, into: HFReader) -> None:
    """Our language model must have the tensors and shapes of the one it replaces (the projector feeds its hidden
    size, the image tokens index its vocabulary); other choices (RoPE, norm epsilon, a tied head) are written as ours."""
    if native_shapes(cfg) == native_shapes(into.config):
        return
    theirs = dataclasses.asdict(into.config)
    differ = [f"{key} {value!r} (theirs {theirs[key]!r})" for key, value in dataclasses.asdict(cfg).items()
              if value != theirs[key]]
    raise UsageError(f"our language model does not fit the {into.family.model_type} model of --vision-from "
                     f"{into.directory}: {', '.join(differ[:3])}; fine-tune from that checkpoint "
                     "(--checkpoint.init_from) to get one that does")


def byte_token_ids(path: Path, cfg: ModelConfig) -> Optional[dict]:
    """Token ids for config.json of a native checkpoint trained with the byte tokenizer. Preprocessing ends
    every document with the end-of-document id (256) and adds no other special token, so that id is what
    the model saw between documents: its eos, bos and pad. None for any other tokenizer or vocabulary."""
    saved = read_config(resolve_checkpoint(str(path)))
    if saved.get("data", {}).get("tokenizer") != "byte" or cfg.vocab_size != ByteTokenizer.vocab_size:
        return None
    return dict.fromkeys(TOKEN_KEYS, ByteTokenizer.eod)


def _carry_files(reader: Reader, out: Path, output_format: str, into: Optional[HFReader]) -> None:
    """Tokenizer files go everywhere (into a multimodal checkpoint: its own, with its processor's); the Hugging Face
    config rides beside non-HF outputs (hf_config.json); a Hugging Face output without a generation_config.json gets
    one with config.json's token ids, which transformers' generate() reads."""
    source, names = (into.directory, TOKENIZER_FILES + PROCESSOR_FILES) if into else (reader.directory, TOKENIZER_FILES)
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if output_format == "hf" and not (out / "generation_config.json").exists():
        config = json.loads((out / "config.json").read_text())
        ids = {key: config[key] for key in TOKEN_KEYS if config.get(key) is not None}
        if ids:
            (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    if output_format != "hf" and reader.hf_config is not None:
        (out / HF_CONFIG).write_text(json.dumps(reader.hf_config, indent=2))


class _IntoModel:
    """A writer that copies each group into a model's parameters: loading holds the model once."""

    ties_head = True  # a tied head is the embedding's very tensor: reading it again would copy it twice

    def __init__(self, model: torch.nn.Module):
        self.params = model.state_dict()  # shares storage with the parameters

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.params[name].copy_(tensor)  # casts to the model's dtype and device

    def finish(self) -> int:
        return 0


def checkpoint_model_config(path: str) -> ModelConfig:
    """The model config of a checkpoint in any of the three formats, read without its tensors."""
    return open_reader(detect_format(path), Path(path)).config


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A checkpoint in any of the three formats (detected) as a model on `device` in `dtype`, in eval mode.
    Built on the meta device and allocated once in its final dtype: no random initialisation, and each
    tensor read is copied straight into its place (one copy of the weights, plus one layer in flight)."""
    reader = open_reader(detect_format(path), Path(path))
    model = build_model(reader.config, torch.device(device), init=False, dtype=dtype)  # the stream writes every weight
    return fill_model(reader, model, path)


def fill_model(reader: Reader, model: torch.nn.Module, path: str) -> torch.nn.Module:
    """`model` (built for reader.config, its weights allocated wherever the caller chose) with every state-dict
    entry copied in from `reader`, in eval mode."""
    with torch.no_grad():
        stream(reader, _IntoModel(model), None, f"loading {path}")  # every state-dict entry is written
    return model.eval()
