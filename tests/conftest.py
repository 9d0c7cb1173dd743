"""Shared fixtures: the embedded corpus built once per session, and a tiny-model config maker."""

import socket
from pathlib import Path

import pytest

from megatron_llm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ("networking", "text", "concurrency")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The stdlib corpus, built by the same code a first `train.py` run uses."""
    from megatron_llm.config import DatasetSpec
    from megatron_llm.data.default_corpus import ensure_default_corpus

    directory = tmp_path_factory.mktemp("corpus")
    ensure_default_corpus([DatasetSpec(path=str(directory / name)) for name in CHANNELS], "byte")
    return directory


def tiny_overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    """A 2-layer model small enough for a step in milliseconds, on the session corpus."""
    blend = "[" + ", ".join(f"{{path: {corpus / name}}}" for name in CHANNELS) + "]"
    values = {
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 128, "model.max_seq_len": 64,
        "data.seq_len": 32, "data.blend": blend, "data.default_corpus": False,
        "training.micro_batch_size": 4, "training.steps": 8, "training.eval_interval": 4, "training.eval_iters": 2,
        "schedule.warmup_steps": 2, "optimizer.lr": 3e-3,
        "checkpoint.dir": str(run_dir / "ckpt"), "checkpoint.interval": 4,
        "logging.interval": 2, "logging.tensorboard_dir": str(run_dir / "tb"),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    out = []
    for key, value in values.items():
        out += [f"--{key}", "null" if value is None else str(value)]
    return out


@pytest.fixture
def tiny_config(corpus_dir, tmp_path):
    """tiny_config(**overrides) -> Config; override keys use '__' for '.', e.g. training__steps=4."""

    def make(run_dir: Path = tmp_path, **extra):
        return load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(corpus_dir, run_dir, **extra))

    return make


def first_batch(cfg) -> dict:
    """The trainer's first global batch at one process, built the way it builds it (megatron-core's datasets
    need a process group, even of one)."""
    import torch.distributed as dist

    from megatron_llm.data.datasets import build_datasets
    from megatron_llm.data.loader import TrainBatches

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        t = cfg.training
        data = build_datasets(cfg.data, vocab_size=cfg.model.vocab_size, seed=t.seed,
                              num_train_samples=t.steps * t.micro_batch_size, num_valid_samples=1)
        (batch,) = TrainBatches(data.train, t.micro_batch_size, 1, 0, 1).next_step()
    finally:
        dist.destroy_process_group()
    return batch


def perturb_norms_and_biases(model, scale: float = 0.1) -> None:
    """Adds N(0, scale) noise to every norm weight and bias of a transformers model: transformers initialises
    norms to one and biases to zero, which would hide a mapping mistake between them."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * scale)


def hf_native_hf(source, tmp_path) -> "Path":
    """Converts the Hugging Face directory `source` to native and back into tmp_path/hf, asserts every tensor
    came back bit for bit under its own name, and returns the directory written."""
    import torch
    from safetensors.torch import load_file

    from megatron_llm.checkpoint.convert import convert

    convert(str(source), "hf", str(tmp_path / "native"), "native")
    convert(str(tmp_path / "native"), "native", str(tmp_path / "hf"), "hf")
    before, after = load_file(Path(source) / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    return tmp_path / "hf"


def transformers_first_loss(hf, cfg) -> tuple[float, dict]:
    """(transformers' masked token-mean loss on the trainer's first batch, that batch)."""
    import torch
    import torch.nn.functional as F

    batch = first_batch(cfg)
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    return ((ce * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()).item(), batch


@pytest.fixture
def mcore():
    """megatron-core's reference helpers (tests/mcore_reference.py) inside its one-process world."""
    import mcore_reference  # megatron-core is a dependency: a failed import fails the test

    with mcore_reference.megatron_core_world():
        yield mcore_reference
