"""megatron_llm: Megatron-style pretraining of open model families on PyTorch's own distributed engine."""


def load_model(path: str):
    """A checkpoint directory as a single-process fp32 model in eval mode on CPU: native (a step
    directory, or a checkpoint.dir with `latest`), Hugging Face (config.json + safetensors) or Megatron-LM
    (latest_checkpointed_iteration.txt + mp_rank_* shards at any tp/pp); the format is detected.
    `model(input_ids)` returns logits [batch, seq, vocab]."""
    from megatron_llm.checkpoint.convert import load_model as load_any

    return load_any(str(path))


def __getattr__(name: str):
    """`megatron_llm.LLM` (a loaded model to generate with, score and inspect), imported on first use."""
    if name == "LLM":
        from megatron_llm.inference.llm import LLM

        return LLM
    raise AttributeError(f"module 'megatron_llm' has no attribute {name!r}")
