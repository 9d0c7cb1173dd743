"""Generate from a trained model: any checkpoint the converter reads, with its tokenizer.

    python tools/generate.py --model checkpoints/tiny --prompt "def " --max-new-tokens 200
    python tools/generate.py --model checkpoints/tiny --prompt "import " --prompt "class " --temperature 0.8 --top-p 0.95
    python tools/generate.py --model hf/Qwen3-0.6B --prompt "The capital of France is" --stream
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402


def main(argv: list[str]) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (native, Hugging Face or Megatron-LM)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string; repeatable")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print the first prompt's text as it is decoded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's)")
    a = p.parse_args(argv)
    try:
        from megatron_llm.inference.llm import LLM

        llm = LLM.load(a.model, device=a.device, dtype=a.dtype, tokenizer=a.tokenizer)
        options = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       stop=a.stop, seed=a.seed)
        if a.stream:
            print(a.prompt[0], end="", flush=True)
            for piece in llm.stream_generate(a.prompt[0], **options):
                print(piece, end="", flush=True)
            print()
            return 0
        for prompt, text in zip(a.prompt, llm.generate(a.prompt, **options)):
            print(f"{prompt}{text}\n{'-' * 40}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
