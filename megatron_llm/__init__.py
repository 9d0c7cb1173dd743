"""megatron_llm: Megatron-style pretraining of LLaMA-family models on PyTorch's own distributed engine."""

from pathlib import Path


def load_model(path: str):
    """A native checkpoint (a step directory, or a checkpoint.dir with `latest`) as a single-process
    fp32 model in eval mode on CPU. `model(input_ids)` returns logits [batch, seq, vocab]."""
    import torch

    from megatron_llm.checkpoint.native import load_model_state, read_config, resolve_checkpoint
    from megatron_llm.config import config_from_dict
    from megatron_llm.model import build_model

    step_dir = resolve_checkpoint(str(Path(path)))
    model_cfg = config_from_dict({"model": read_config(step_dir)["model"]}).model
    model = build_model(model_cfg, torch.device("cpu"))
    load_model_state(step_dir, model)
    return model.eval()
