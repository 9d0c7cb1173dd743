#!/usr/bin/env python
"""Convert checkpoints between Hugging Face, Megatron-LM and megatron_llm's native format, any direction.

Hugging Face -> Megatron-LM at tp=2, pp=2 (megatron-core local-spec names):
    python tools/convert_checkpoint.py --input hf/Llama-3.2-1B --input-format hf \\
        --output ckpt/llama-tp2pp2 --output-format megatron --tp 2 --pp 2
Mixtral -> Megatron-LM at tp=2, pp=2, ep=2 (experts as local_experts.{l}, E/2 per mp_rank_TT_PPP_EEE file):
    python tools/convert_checkpoint.py --input hf/Mixtral-8x7B --input-format hf \\
        --output ckpt/mixtral --output-format megatron --tp 2 --pp 2 --ep 2
The same with each expert whole on its rank (Megatron's parallel folding, expert_tensor_parallel_size 1):
    ... --tp 2 --pp 2 --ep 2 --etp 1
Reshard a Megatron-LM checkpoint (tp=4, pp=2 -> tp=2, pp=1):
    python tools/convert_checkpoint.py --input ckpt/a --input-format megatron --output ckpt/b --output-format megatron --tp 2
Hugging Face -> native, then train from it:
    python tools/convert_checkpoint.py --input hf/Qwen3-0.6B --input-format hf --output ckpt/qwen3 --output-format native
    python train.py --config my.yaml --checkpoint.resume ckpt/qwen3   # the model section must match
A language model fine-tuned from a multimodal checkpoint (--checkpoint.init_from hf/Qwen3-VL-2B) written back into
it: its config.json, vision tower, projector and processor files, with our weights as its language model:
    python tools/convert_checkpoint.py --input ckpt/run --input-format native --output hf/Qwen3-VL-2B-tuned \
        --output-format hf --vision-from hf/Qwen3-VL-2B    # --output-family qwen3_vl is implied

The output appears complete or not at all (it is written beside, then renamed). Bad input exits with
code 2 and a one-line `error: ...`.
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402

FORMATS = ("hf", "megatron", "native")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?B)$", re.IGNORECASE)


def _bytes(text: str) -> int:
    match = SIZE.match(text.strip())
    size = int(float(match.group(1)) * 1024 ** "BKMG".index(match.group(2).upper()[0])) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB or 500MB")
    return size


def parser() -> ArgumentParser:
    from megatron_llm.checkpoint.families import FAMILIES
    from megatron_llm.checkpoint.families.multimodal import WRAPPERS

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--input-format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="directory to create (must not exist unless --overwrite)")
    p.add_argument("--output-format", required=True, choices=FORMATS)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of a Megatron output")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of a Megatron output")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of a Megatron output (mixture-of-experts models)")
    p.add_argument("--etp", type=int, default=None,
                   help="expert tensor-parallel size of a Megatron output, dividing --tp (1: each expert whole, Megatron's "
                        "parallel folding); default: --tp")
    p.add_argument("--megatron-spec", choices=("local", "te"), default="local",
                   help="Megatron key names: megatron-core's local spec or the Transformer Engine spec")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="output dtype (default: the input's; with --vision-from, that checkpoint's language model's)")
    p.add_argument("--output-family", "--hf-family", dest="hf_family", choices=sorted({*FAMILIES, *WRAPPERS}),
                   default=None, metavar="MODEL_TYPE",
                   help="model_type of a Hugging Face output, rewriting the model as that family when it can express it "
                        "(default: the source's, else the first that fits); one of: " + ", ".join(sorted(FAMILIES))
                        + "; or a multimodal one, with --vision-from: " + ", ".join(sorted(WRAPPERS)))
    p.add_argument("--vision-from", default=None, metavar="VL_DIR",
                   help="a multimodal Hugging Face checkpoint to write the model into as its language model: the output "
                        "is VL_DIR (config, vision tower, projector, tokenizer and processor files) with our weights")
    p.add_argument("--max-shard-size", type=_bytes, default="5GB", help="largest safetensors shard of a Hugging Face output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)  # a malformed command line exits 2 with one line
    try:
        from megatron_llm.checkpoint.convert import Options, convert

        opts = Options(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, spec=args.megatron_spec, dtype=args.dtype, hf_family=args.hf_family,
                       vision_from=args.vision_from, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
        summary = convert(args.input, args.input_format, args.output, args.output_format, opts)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
