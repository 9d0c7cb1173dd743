"""Typed configuration: YAML file, then dotted command-line overrides, then one validation pass.

Every setting is one field below with a one-line help string; `python train.py --help` is generated
from these dataclasses. Precedence: command line over file over defaults. Unknown keys, wrong types
and impossible combinations raise `UsageError` naming the key, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig, param  # noqa: F401  (ModelConfig re-exported)


@dataclass
class ParallelConfig:
    tp: int = param(
        1, "tensor-parallel size; a MoE layer's routed experts are split too, each rank holding 1/tp of every expert's "
        "inner width (Megatron's default expert_tensor_parallel_size = tp), and its shared experts like the dense MLP"
    )
    pp: int = param(1, "pipeline-parallel size")
    sp: bool = param(False, "sequence parallelism inside tensor-parallel groups (needs data.seq_len % tp == 0)")
    data_parallel: Literal["fsdp", "ddp"] = param("fsdp", "data-parallel wrapper over the dp mesh dimension")
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"] = param(
        "1f1b", "pipeline schedule; the interleaved ones need virtual_stages > 1, zbv exactly 2"
    )
    virtual_stages: int = param(1, "pipeline stages per pp rank (model chunks of the interleaved schedules)")
    stage_layers: Optional[list[int]] = param(
        None, "layers of each pipeline stage, pp x virtual_stages entries summing to model.num_layers; null: even"
    )
    timeout_s: float = param(600.0, "seconds a collective may wait before the job fails (a dead or stuck rank)")
    ep: int = param(1, "expert-parallel size: each rank holds model.moe_experts / ep experts; a split of the dp ranks")

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def validate(self, model: ModelConfig, seq_len: int, micro_batches: int, evaluates: bool) -> None:
        """Layout checks that need no process group, so every rank refuses before any collective."""
        tp, stages = self.tp, self.num_stages
        if self.virtual_stages <= 0 or self.timeout_s <= 0:
            raise UsageError("parallel.virtual_stages and parallel.timeout_s must be positive")
        heads = ("num_heads", "num_kv_heads", "linear_num_key_heads", "linear_num_value_heads", "full_kv_heads")
        for key in (*heads, "ffn_hidden_size", "mamba_num_heads", "mamba_groups"):
            if (getattr(model, key) or 0) % tp:  # full_kv_heads null: the full layers' are num_kv_heads
                # Key/value heads are split, never replicated: each tp rank owns whole GQA groups (and a linear
                # layer's key heads with the value heads they serve).
                raise UsageError(f"model.{key} ({getattr(model, key)}) is not divisible by parallel.tp ({tp})")
        for key in ("moe_ffn_hidden_size", "moe_shared_ffn_hidden_size") if model.moe_experts else ():
            if getattr(model, key) % tp:  # the experts' inner widths are split over tp
                raise UsageError(f"model.{key} ({getattr(model, key)}) is not divisible by parallel.tp ({tp})")
        if self.ep <= 0 or (self.ep > 1 and (not model.moe_experts or model.moe_experts % self.ep)):
            raise UsageError(
                f"parallel.ep ({self.ep}) must be positive and divide model.moe_experts ({model.moe_experts})"
            )
        if tp > 1 and model.moe_experts and model.moe_weight_input:  # the weights' gradient needs whole expert inputs
            raise UsageError("model.moe_weight_input scales the experts' inputs, whose gradients parallel.tp splits: use tp 1")
        if model.dsa_index_topk is not None and not (model.dsa_indexer_frozen or model.dsa_indexer_loss_coeff):
            raise UsageError("model.dsa_index_topk: the sparse attention's indexer gets no gradient through its top-k: "
                             "set model.dsa_indexer_loss_coeff > 0 (megatron-core's KL loss to the main attention) or "
                             "model.dsa_indexer_frozen true")
        if model.dsa_indexer_loss_coeff and tp > 1:  # megatron-core all-reduces its target over tp; ours has not
            raise UsageError("model.dsa_indexer_loss_coeff: the indexer loss's target sums the main attention over "
                             "every head, which parallel.tp splits: use tp 1 (or model.dsa_indexer_frozen true)")
        router_losses = model.moe_aux_loss_coeff or model.moe_z_loss_coeff
        if self.pp > 1 and model.moe_experts and router_losses and model.moe_aux_loss_scope == "model":
            raise UsageError(
                "model.moe_aux_loss_scope model takes the routers of every layer in one loss, which parallel.pp "
                "splits: set model.moe_aux_loss_scope layer (Megatron's per-layer losses) or use pp 1"
            )
        if model.mtp_layers and self.pp > 1 and self.schedule == "zbv":  # first and last stage on one rank
            raise UsageError("model.mtp_layers keeps a copy of the embedding on the last pipeline stage, which zbv puts "
                             "on the first stage's rank: use parallel.schedule interleaved_zb (or 1f1b, interleaved_1f1b)")
        if self.sp and seq_len % tp:
            raise UsageError(f"parallel.sp shards the sequence: data.seq_len ({seq_len}) must be divisible by parallel.tp ({tp})")
        if self.stage_layers is not None:
            if len(self.stage_layers) != stages or sum(self.stage_layers) != model.num_layers:
                raise UsageError(
                    f"parallel.stage_layers {self.stage_layers} needs {stages} entries (pp x virtual_stages) "
                    f"summing to model.num_layers ({model.num_layers})"
                )
            if min(self.stage_layers[1:-1], default=1) < 1 or min(self.stage_layers) < 0:
                raise UsageError(f"parallel.stage_layers {self.stage_layers}: a middle stage needs at least one layer")
        elif model.num_layers % stages:
            raise UsageError(
                f"model.num_layers ({model.num_layers}) is not divisible by the {stages} pipeline stages "
                "(pp x virtual_stages); set parallel.stage_layers"
            )
        if self.pp == 1:
            if self.virtual_stages != 1:
                raise UsageError("parallel.virtual_stages > 1 needs parallel.pp > 1")
            return
        interleaved = self.schedule in ("interleaved_1f1b", "interleaved_zb")
        if self.schedule in ("gpipe", "1f1b") and self.virtual_stages != 1:
            raise UsageError(f"parallel.schedule {self.schedule} runs one stage per rank: set parallel.virtual_stages 1")
        if interleaved and self.virtual_stages < 2:
            raise UsageError(f"parallel.schedule {self.schedule} needs parallel.virtual_stages >= 2")
        if self.schedule == "zbv" and self.virtual_stages != 2:
            raise UsageError("parallel.schedule zbv needs parallel.virtual_stages 2 (a V of two stages per rank)")
        if self.schedule == "zbv" and evaluates:
            raise UsageError(
                "parallel.schedule zbv cannot evaluate (torch's ZBV has no forward-only pass): set "
                "training.eval_interval 0, or use interleaved_zb, the other zero-bubble schedule"
            )
        need = {"1f1b": self.pp, "zbv": stages}.get(self.schedule, 1)
        if micro_batches < need or (interleaved and micro_batches % self.pp):
            rule = f"a multiple of parallel.pp ({self.pp})" if interleaved else f"at least {need}"
            raise UsageError(
                f"parallel.schedule {self.schedule} needs training.grad_accum_steps (the micro-batches) {rule}, "
                f"got {micro_batches}"
            )


def tag_safe(name: str) -> str:
    """A channel name as a TensorBoard tag component and a file name: letters, digits, '_', '-', '.' only."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_"


@dataclass
class DatasetSpec:
    path: str = param("", "prefix of a .bin/.idx pair written by tools/preprocess_data.py")
    weight: float = param(1.0, "sampling weight in the blend")
    name: Optional[str] = param(None, "channel name; null means the file stem")


@dataclass
class DataConfig:
    blend: list[DatasetSpec] = param([], "datasets to blend: a list of {path, weight, name}")
    default_corpus: bool = param(
        False, "build the embedded stdlib corpus into the blend's directory when its files are missing"
    )
    tokenizer: str = param("byte", "'byte' or the path of a Hugging Face tokenizer.json (for the vocab check)")
    seq_len: int = param(128, "tokens per training sequence")
    split: str = param("98,2,0", "train,valid,test weights of each dataset's documents")
    cache_dir: Optional[str] = param(None, "where megatron-core caches its sample indices; null: beside the data")
    num_workers: int = param(0, "DataLoader worker processes")
    random_channels: Optional[int] = param(
        None, "give every training sample a seeded random channel out of K (all K curves must then agree)"
    )
    format: Literal["pretrain", "sft", "pairs"] = param(
        "pretrain", "pretrain: documents concatenated into sequences; sft: conversations with loss masks "
        "(tools/preprocess_data.py --format chat), the loss on their assistant tokens only; pairs: preference "
        "pairs (--format pairs) for a reward model (model.head score)"
    )
    packing: bool = param(
        True, "sft: several conversations per sequence (best-fit) with document masks; false: one each, padded"
    )
    document_mask: bool = param(
        False, "pretrain: no token attends across the end of a document; positions restart at each document"
    )


@dataclass
class OptimizerConfig:
    lr: float = param(1e-3, "peak learning rate")
    min_lr: float = param(1e-4, "learning rate at the end of the decay")
    weight_decay: float = param(0.1, "decoupled (AdamW) weight decay")
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.95, "AdamW beta2")
    eps: float = param(1e-8, "AdamW epsilon")
    grad_clip: float = param(1.0, "clip the global gradient norm to this; 0 disables")
    decay_norms_and_biases: bool = param(False, "apply weight decay to norm weights and biases too")
    decay_embeddings: bool = param(False, "apply weight decay to the token embedding too")


@dataclass
class ScheduleConfig:
    warmup_steps: int = param(10, "linear warm-up from 0 to optimizer.lr over this many steps")
    decay: Literal["cosine", "linear", "constant", "wsd"] = param("cosine", "shape after warm-up")
    decay_steps: Optional[int] = param(None, "steps from the end of warm-up to min_lr; null means training.steps - warmup")
    wsd_decay_fraction: float = param(0.2, "for wsd: the final fraction of decay_steps that decays (linearly)")


@dataclass
class TrainingConfig:
    steps: int = param(200, "optimizer steps to train")
    micro_batch_size: int = param(8, "sequences per micro-batch on each data-parallel rank")
    grad_accum_steps: int = param(1, "micro-batches per optimizer step (global batch = micro x accum x dp)")
    seed: int = param(1234, "seed of init, data order and dropout-free determinism")
    device: Literal["auto", "cpu", "cuda"] = param("auto", "auto picks cuda when available")
    dtype: Literal["auto", "fp32", "bf16"] = param("auto", "auto: bf16 autocast on cuda, fp32 on cpu")
    z_loss: float = param(0.0, "z-loss coefficient: adds coeff * mean(logsumexp(logits)^2)")
    reward_margin: float = param(0.0, "data.format pairs: the margin m of -log sigmoid(r_chosen - r_rejected - m)")
    reward_centering: float = param(0.0, "data.format pairs: adds coeff * (r_chosen + r_rejected)^2, keeping rewards near 0")
    max_bad_steps: int = param(5, "stop after this many consecutive NaN/Inf steps (each is skipped)")
    eval_interval: int = param(50, "evaluate every N steps (0 disables)")
    # 40: on the tiny run a channel's val_loss then varies by ~0.02-0.03 nats between sample sets, below the
    # gaps between channels; at 4 it varied by ~0.1, more than those gaps (measured; see README).
    eval_iters: int = param(40, "micro-batches per channel per evaluation")
    compile: bool = param(False, "torch.compile the blocks")
    activation_checkpointing: Literal["none", "full"] = param(
        "none", "full: each block keeps only its input and recomputes its forward in the backward (~1/3 more compute)"
    )


@dataclass
class CheckpointConfig:
    dir: str = param("checkpoints/tiny", "directory holding step_XXXXXXX/ checkpoints and the 'latest' pointer")
    interval: int = param(100, "save every N steps (and always at the end); 0 saves only at the end")
    keep: int = param(2, "keep the newest K checkpoints (0 keeps all)")
    resume: Optional[str] = param(None, "'auto' continues from dir/latest; a path resumes from that checkpoint")
    overwrite: bool = param(
        False, "start from scratch in a dir that holds another run's checkpoints (checkpoint.keep prunes them as this run saves)"
    )
    init_from: Optional[str] = param(
        None,
        "fine-tune: start at step 0 from the weights of any checkpoint (Hugging Face, Megatron-LM, native), whose "
        "model section replaces the config's; a resumable checkpoint in dir still wins (a restarted run continues)",
    )


@dataclass
class LoggingConfig:
    interval: int = param(10, "console and TensorBoard every N steps")
    tensorboard_dir: Optional[str] = param("runs/tiny", "TensorBoard event directory; null disables")
    per_channel: bool = param(True, "loss/<channel>, tokens/<channel> and val_loss/<channel>; false skips that accounting")
    run_name: Optional[str] = param(
        None, "this run's directory under tensorboard_dir and its W&B id; null: a resumed run's own, else the start time"
    )
    wandb_project: Optional[str] = param(None, "also log to this Weights & Biases project (needs wandb; WANDB_MODE=offline works)")

    def validate(self) -> None:
        if self.run_name is not None and (not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.run_name) or set(self.run_name) == {"."}):
            raise UsageError(f"logging.run_name {self.run_name!r} must be a plain name: letters, digits, '_', '-' and '.'")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise UsageError("logging.wandb_project is set but wandb is not installed: pip install wandb, or unset the key")


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Checks that need no process group; layout checks against the world size live in parallel/."""
        self.model.validate()
        self.logging.validate()
        t, d, o, s = self.training, self.data, self.optimizer, self.schedule
        positive = {
            "training.steps": t.steps, "training.micro_batch_size": t.micro_batch_size,
            "training.grad_accum_steps": t.grad_accum_steps, "training.max_bad_steps": t.max_bad_steps,
            "data.seq_len": d.seq_len, "parallel.tp": self.parallel.tp, "parallel.pp": self.parallel.pp,
            "logging.interval": self.logging.interval,
        }
        for key, value in positive.items():
            if value <= 0:
                raise UsageError(f"{key} must be positive, got {value}")
        self._check_numbers()
        self.parallel.validate(self.model, d.seq_len, t.grad_accum_steps, evaluates=t.eval_interval > 0)
        if d.seq_len > self.model.max_seq_len:
            raise UsageError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.model.dsa_indexer_loss_coeff and t.activation_checkpointing != "none":  # training/indexer_loss.py
            raise UsageError("model.dsa_indexer_loss_coeff keeps each layer's indexer loss graph to the backward, which "
                             "a recomputed block does not rebuild: set training.activation_checkpointing none")
        shards = self.model.moe_capacity_sequence_shards
        if self.model.moe_experts and self.model.moe_capacity_factor is not None and d.seq_len % shards:
            raise UsageError(f"model.moe_capacity_sequence_shards ({shards}) drops per equal piece of the sequence: it "
                             f"must divide data.seq_len ({d.seq_len})")
        if not d.blend:
            raise UsageError("data.blend is empty: list at least one {path, weight, name} dataset")
        names = [spec.name or Path(spec.path).name for spec in d.blend]
        if len(set(names)) != len(names):
            raise UsageError(f"data.blend has duplicate channel names {names}: give each dataset a distinct name")
        same_tag = [[n for n in names if tag_safe(n) == tag_safe(name)] for name in names]
        clash = next((group for group in same_tag if len(group) > 1), None)
        if clash:
            raise UsageError(
                f"data.blend channel names {clash} would all be logged as loss/{tag_safe(clash[0])}: rename them to "
                "differ in letters, digits, '_', '-' or '.'"
            )
        if (d.format == "pairs") != (self.model.head == "score"):
            raise UsageError("a reward model trains on preference pairs: set data.format pairs together with model.head score")
        if d.format == "pairs" and t.micro_batch_size % 2:
            raise UsageError("data.format pairs needs an even training.micro_batch_size (a pair is two rows, chosen and rejected)")
        if d.document_mask and d.format != "pretrain":
            raise UsageError("data.document_mask is for data.format pretrain; packed sft conversations are always masked")
        recurrent = {"linear", "mamba"} & set(self.model.layer_types or [])
        if (d.document_mask or (d.format == "sft" and d.packing)) and recurrent:
            raise UsageError("model.layer_types has linear-attention layers or mamba layers, whose state runs through "
                             "the whole sequence: packed documents cannot be kept apart there; set data.document_mask "
                             "false (pretrain) or data.packing false (sft)")
        if d.random_channels is not None and d.random_channels <= 0:
            raise UsageError(f"data.random_channels must be positive or null, got {d.random_channels}")
        if any(spec.weight <= 0 for spec in d.blend):
            raise UsageError("data.blend weights must be positive")
        # What torch's AdamW would refuse only after the process group exists, and a negative clip or decay
        # that it would take (a negative clip flips the gradient).
        for key in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            if getattr(o, key) < 0:
                raise UsageError(f"optimizer.{key} must be >= 0, got {getattr(o, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(o, key) < 1:
                raise UsageError(f"optimizer.{key} must be in [0, 1), got {getattr(o, key)}")
        if o.min_lr > o.lr:
            raise UsageError(f"optimizer.min_lr ({o.min_lr}) exceeds optimizer.lr ({o.lr})")
        if s.warmup_steps < 0:
            raise UsageError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if not 0 <= s.wsd_decay_fraction <= 1:
            raise UsageError(f"schedule.wsd_decay_fraction must be in [0, 1], got {s.wsd_decay_fraction}")
        if self.checkpoint.interval < 0 or self.checkpoint.keep < 0:
            raise UsageError("checkpoint.interval and checkpoint.keep must be >= 0")
        check_split(d.split, "data.split")

    def _check_numbers(self) -> None:
        """Values the type check lets through: nan and inf (YAML's .nan, .inf), seeds numpy refuses, and an
        evaluation of zero batches (a division by zero tokens after the first eval_interval steps)."""
        for section in SECTIONS:
            values = getattr(self, section)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise UsageError(f"{section}.{f.name} must be a finite number, got {value}")
        t = self.training
        if not 0 <= t.seed < 2**32:
            raise UsageError(f"training.seed must be in [0, 2**32), got {t.seed}")
        if t.eval_interval < 0:
            raise UsageError(f"training.eval_interval must be >= 0 (0 disables evaluation), got {t.eval_interval}")
        if t.eval_interval and t.eval_iters <= 0:
            raise UsageError(
                f"training.eval_iters must be positive when evaluating (training.eval_interval {t.eval_interval}), "
                f"got {t.eval_iters}; or set training.eval_interval 0"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a Config from plain values, with a type check at every leaf.


def check_split(split: str, key: str) -> None:
    """Refuses a `train,valid,test` weight triple that megatron-core's split would fail on (nan, a missing weight)."""
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or not all(0 <= w < float("inf") for w in weights) or weights[0] <= 0:
        raise UsageError(f"{key} must be three non-negative weights 'train,valid,test', got {split!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin is list:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against annotation `tp`; ints are accepted for floats. Raises UsageError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UsageError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[tp]
    if not ok:
        raise UsageError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise UsageError(f"unknown key {prefix}.{key}; valid keys: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()})


def config_from_dict(raw: dict) -> Config:
    for section in raw:
        if section not in SECTIONS:
            raise UsageError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        body = raw.get(name) or {}
        if not isinstance(body, dict):
            raise UsageError(f"section {name} must be a mapping, got {body!r}")
        sections[name] = _build(cls, body, name)
    return Config(**sections)


def _parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--section.key value` or `--section.key=value`; values are parsed as YAML scalars."""
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise UsageError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value")
            key, text = arg[2:], argv[i + 1]
            i += 2
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UsageError(f"--{key}: cannot parse value {text!r}") from None
    return overrides


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """File, then command-line overrides, then validation. The result is ready to use."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"config file {path} not found") from None
        except UnicodeDecodeError:
            raise UsageError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
        except OSError as e:  # a directory, no permission
            raise UsageError(f"cannot read config file {path} ({e.strerror or e}): pass a YAML file") from None
        except yaml.YAMLError as e:
            raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"config file {path} must hold a mapping of sections")
    parsed = _parse_overrides(list(overrides))
    for dotted, value in parsed.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise UsageError(f"unknown section in --{dotted}; valid sections: {', '.join(SECTIONS)}")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    init_from = (raw.get("checkpoint") or {}).get("init_from")
    if init_from is not None:
        raw["model"] = _model_of_checkpoint(str(init_from), {k: v for k, v in parsed.items() if k.startswith("model.")})
    config = config_from_dict(raw)
    config.validate()
    return config


def _model_of_checkpoint(path: str, model_overrides: dict[str, Any]) -> dict:
    """The model section of the checkpoint `path` (any format), which replaces the config file's: a
    fine-tune trains the architecture it loads. A command-line --model.KEY that contradicts it is refused."""
    from megatron_llm.checkpoint.convert import checkpoint_model_config  # the checkpoint readers import this module

    model = checkpoint_model_config(path)
    hints = typing.get_type_hints(ModelConfig)
    for dotted, value in model_overrides.items():
        key = dotted.partition(".")[2]
        if key not in hints:
            raise UsageError(f"unknown key {dotted}; valid keys: {', '.join(sorted(hints))}")
        if key == "head" and _coerce(value, hints[key], dotted) == "score":
            # The one change a fine-tune may make: a language model becomes a reward model under a new,
            # plain score head (training/reward.py stages its weights without the old head).
            model.head, model.tie_embeddings, model.norm_head, model.output_bias = "score", False, False, False
            continue
        if key in ("dsa_indexer_frozen", "dsa_indexer_loss_coeff"):  # how the indexer trains, not what it is
            setattr(model, key, _coerce(value, hints[key], dotted))
            continue
        if _coerce(value, hints[key], dotted) != getattr(model, key):
            raise UsageError(
                f"--{dotted} {value!r} contradicts checkpoint.init_from {path}, whose model has {key}="
                f"{getattr(model, key)!r}: drop the override (the model section comes from the checkpoint)"
            )
    return dataclasses.asdict(model)


def help_text() -> str:
    """Every key with its type, default and meaning, generated from the dataclasses."""
    lines = [
        "usage: train.py --config FILE.yaml [--section.key VALUE ...]",
        "",
        "Every key below can be set in the YAML file or overridden on the command line.",
    ]
    for name, cls in SECTIONS.items():
        lines.append(f"\n{name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{name}.{f.name} ({_type_name(hints[f.name])}, default {default!r})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> Config:
    """train.py's command line: --config FILE plus overrides; --help prints every key and exits 0."""
    if "-h" in argv or "--help" in argv:
        print(help_text())
        sys.exit(0)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UsageError("--config needs a file path")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    return load_config(path, argv)
