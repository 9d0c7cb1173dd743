"""The training loop: set up, then for each step run the micro-batches, clip, update, log, save.

The loop is written for a mesh: every sum that defines the loss is reduced over the data-parallel
group, the global token count is fixed before the first micro-batch, and only rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_llm.checkpoint.convert import Options, checkpoint_model_config, convert, detect_format
from megatron_llm.checkpoint.native import read_config, resolve_checkpoint
from megatron_llm.checkpoint.run_dir import RunDirectory, open_run_directory
from megatron_llm.config import Config, config_from_dict
from megatron_llm.data.datasets import build_datasets
from megatron_llm.data.default_corpus import ensure_default_corpus
from megatron_llm.data.loader import TrainBatches
from megatron_llm.errors import UsageError
from megatron_llm.logging import MetricsLogger
from megatron_llm.logging.banner import banner, parameters_per_rank
from megatron_llm.logging.progress import Clock
from megatron_llm.logging.runs import new_run_name
from megatron_llm.model import flops_per_token
from megatron_llm.parallel import ParallelDims, init_distributed, parallelize_from_config, pick_device
from megatron_llm.training.channels import ChannelTotals, merge, tag_safe
from megatron_llm.training.faults import StopSignals, name_hung_ranks, weights_finite
from megatron_llm.training.host_memory import keep_freed_host_memory
from megatron_llm.training.lr_schedule import lr_at
from megatron_llm.training.metrics import peak_flops
from megatron_llm.training.optimizer import build_optimizer
from megatron_llm.training.evaluation import channel_sums, mean_loss, rate_scalars
from megatron_llm.training.reward import reward_objective, stage_under_score_head
from megatron_llm.training.step import StepResult, autocast_dtype, train_step


class TrainingDiverged(UsageError):
    """Too many consecutive steps with a NaN/Inf loss or gradient norm."""


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, steps run by this call
    val_losses: dict[int, float] = field(default_factory=dict)
    channels: dict[int, ChannelTotals] = field(default_factory=dict)  # step -> channel -> (loss sum, tokens)
    rates: dict[int, dict[str, ChannelTotals]] = field(default_factory=dict)  # step -> reward accuracy, margin sums
    val_channel_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> channel name -> loss
    router_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> moe_aux_loss, moe_z_loss
    mtp_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> mtp_loss/depthK
    skipped_steps: int = 0
    final_step: int = 0
    stopped: str | None = None  # the signal that ended this call early, after a checkpoint


def train(cfg: Config) -> TrainResult:
    """Entry point used by train.py and the tests. Validates, joins the group, trains, tears down."""
    device = pick_device(cfg.training.device)
    if device.type == "cpu":
        keep_freed_host_memory()  # the step's tensors live in host memory: no page faults every step
    with StopSignals() as stop:  # from here on SIGTERM/SIGUSR1 mean: finish the step, checkpoint, stop
        dims = init_distributed(cfg.parallel, device, timeout_s=cfg.parallel.timeout_s)
        try:
            with name_hung_ranks(cfg.parallel.timeout_s), open_run_directory(cfg, dims.is_logger) as run_dir:
                return Trainer(cfg, dims, device, run_dir).run(stop)
        finally:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, run_dir: RunDirectory):
        self.cfg, self.dims, self.device = cfg, dims, device
        t = cfg.training
        self.autocast_dtype = autocast_dtype(t.dtype, device)
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * dims.dp

        torch.manual_seed(t.seed)  # the same init on every rank
        self.data = self._build_data()
        self.model = parallelize_from_config(cfg, dims, device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.checkpointer = run_dir.checkpointer
        self.step, self.consumed_samples, self.consumed_tokens, self.bad_in_a_row, self.skipped = 0, 0, 0, 0, 0
        self.resumed_from: str | None = None
        self._resume(run_dir.resume_from)
        if run_dir.resume_from is None and cfg.checkpoint.init_from is not None:
            self._init_from(cfg.checkpoint.init_from)
        # Only the logging rank's name is used: it writes the run directory and the checkpoints' config.yaml.
        cfg.logging.run_name = cfg.logging.run_name or new_run_name(cfg.logging.tensorboard_dir)
        self.logger = MetricsLogger(cfg.logging, cfg.to_dict(), Clock(self.step, t.steps), enabled=dims.is_logger)
        per_rank = parameters_per_rank(self.model)  # a collective: every rank
        self._print(banner(cfg, dims.dp, per_rank, self.logger.run_dir, self.resumed_from, device))
        if self.data.note:
            self._print(self.data.note)

    def _build_data(self):
        cfg, t = self.cfg, self.cfg.training
        if cfg.data.default_corpus:
            if self.dims.rank == 0:
                ensure_default_corpus(cfg.data.blend, cfg.data.tokenizer)
            dist.barrier()
        return build_datasets(
            cfg.data,
            vocab_size=cfg.model.vocab_size,
            head_rows=cfg.model.output_vocab_size,
            seed=t.seed,
            num_train_samples=t.steps * self.global_batch,
            # Every evaluation reads the same first samples: sized to them, the validation set does not
            # depend on how often the run evaluates (more samples could span epochs and reshuffle them).
            num_valid_samples=max(t.eval_iters * t.micro_batch_size * self.dims.dp, 1),
        )

    # ----------------------------------------------------------------------------------------------
    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        saved = read_config(path)
        # Fields added since the checkpoint was written take their defaults, which reproduce the old model.
        saved_model = dataclasses.asdict(config_from_dict({"model": saved["model"]}).model)
        changed = [k for k, v in self.cfg.to_dict()["model"].items() if saved_model[k] != v]
        if changed:
            raise UsageError(f"checkpoint {path} has a different model.{changed[0]}; resume with the same model config")
        state = self.checkpointer.load(path, self.model, self.optimizer, self._trainer_state())
        if not state:
            self._print(f"initialised the model from the weights-only checkpoint {path}; training starts at step 0")
            return
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.consumed_tokens = state["consumed_tokens"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.skipped = state["skipped"]
        torch.set_rng_state(state["rng_cpu"])
        self.resumed_from = f"{path} at step {self.step}"
        # The run continues its own TensorBoard directory and W&B run unless logging.run_name names another.
        self.cfg.logging.run_name = self.cfg.logging.run_name or saved.get("logging", {}).get("run_name")

    def _init_from(self, source: str) -> None:
        """Fine-tuning: the weights of `source` (any format) at step 0, with a fresh optimizer. A Hugging Face
        or Megatron-LM source is first converted, by rank 0, into a weights-only native checkpoint beside this
        run's, which every rank then loads at its own layout as it would any native checkpoint."""
        new_head = checkpoint_model_config(source).head != self.cfg.model.head  # a reward model from a language model
        staged = detect_format(source) != "native" or new_head
        native = str(Path(self.cfg.checkpoint.dir) / ".init_from") if staged else source
        if staged and self.dims.rank == 0 and new_head:
            stage_under_score_head(source, self.cfg, Path(native))
        elif staged and self.dims.rank == 0:
            convert(source, detect_format(source), native, "native", Options(overwrite=True))
        dist.barrier()
        self.checkpointer.load(resolve_checkpoint(native), self.model, None, {})
        dist.barrier()  # every rank has read the staged copy: it can go
        if staged and self.dims.rank == 0:
            shutil.rmtree(native)
        self.resumed_from = f"the weights of {source} (checkpoint.init_from; its model section replaces the config's), step 0"

    def _trainer_state(self) -> dict:
        """Everything besides model and optimizer that a resumed run needs to continue exactly. The model
        has no dropout, so the CPU generator is the only random state that matters (for later sampling)."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "bad_in_a_row": self.bad_in_a_row,
            "skipped": self.skipped,
            "rng_cpu": torch.get_rng_state(),
        }

    def _save(self) -> Path | None:
        # In a NaN/Inf streak, or with weights no longer finite, a save would become "the last good
        # checkpoint" and prune one that is. (bad_in_a_row is the same on every rank: no collective skipped.)
        if self.bad_in_a_row or not weights_finite(self.model):
            self._print(f"step {self.step}: no checkpoint while not finite; the latest stays {self.checkpointer.latest() or 'none'}")
            return None
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self._trainer_state(), self.cfg.to_dict())
        self._print(f"saved checkpoint {path}")
        return path

    # ----------------------------------------------------------------------------------------------
    def run(self, stop: StopSignals | None = None) -> TrainResult:
        cfg, t = self.cfg, self.cfg.training
        result = TrainResult(final_step=self.step)
        batches = TrainBatches(
            self.data.train, t.micro_batch_size, t.grad_accum_steps, self.dims.dp_rank, self.dims.dp,
            start_sample=self.consumed_samples, num_workers=cfg.data.num_workers,
        )
        flops = flops_per_token(cfg.model, cfg.data.seq_len)
        peak = peak_flops(self.device)
        names = self.data.channel_names
        window = _Window(names)
        try:
            while self.step < t.steps:
                start = time.perf_counter()
                lr = lr_at(self.step, cfg.schedule, cfg.optimizer, t.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                out = train_step(
                    self.model, self.optimizer, batches.next_step(), self.dims,
                    z_loss=t.z_loss, grad_clip=cfg.optimizer.grad_clip, autocast=self.autocast_dtype,
                    num_channels=len(names) if cfg.logging.per_channel else 0,
                    objective=reward_objective(cfg.data.format, t.reward_margin, t.reward_centering, len(names), self.device),
                )
                self._account(out, result)
                self.step += 1
                self.consumed_samples += self.global_batch
                self.consumed_tokens += self.global_batch * cfg.data.seq_len
                window.add(out, time.perf_counter() - start, self.global_batch * cfg.data.seq_len)
                if self.step % cfg.logging.interval == 0 or self.step == t.steps:
                    self.logger.log(self.step, window.scalars(lr, self.consumed_tokens, self.skipped, flops, peak, self.dims, self.device))
                    window = _Window(names)
                # Every eval_interval steps, and after the last step whatever its number.
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps) and self.data.valid_by_channel:
                    self._evaluate(result)
                stop_signal = stop.agreed() if stop is not None and self.step < t.steps else None  # collective
                saved = None
                if self.step < t.steps and (stop_signal or cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                    saved = self._save()
                if stop_signal:
                    result.stopped = stop_signal
                    kept = "checkpoint saved" if saved else f"latest checkpoint {self.checkpointer.latest()}"
                    self._print(f"{stop_signal}: stopped after step {self.step}, {kept}; continue with --checkpoint.resume auto")
                    break
            if result.losses and not result.stopped:  # this call trained to the end: save its end state
                self._save()
        finally:
            self.logger.close()
        result.final_step, result.skipped_steps = self.step, self.skipped
        return result

    def _evaluate(self, result: TrainResult) -> None:
        """val_loss/<channel> on each channel's own validation split, and val_loss as their token-weighted
        mean over the very same tokens, so the overall curve always lies among the channels' curves."""
        t = self.cfg.training
        reward = (t.reward_margin, t.reward_centering) if self.cfg.data.format == "pairs" else None  # loss per pair
        sums, rates = channel_sums(self.model, self.data.valid_by_channel, t.micro_batch_size, t.eval_iters, self.dims,
                                   self.autocast_dtype, reward)
        result.val_losses[self.step] = mean_loss(sums)
        per_channel = {name: loss / n for name, (loss, n) in sums.items()} if self.cfg.logging.per_channel else {}
        result.val_channel_losses[self.step] = per_channel
        scalars = {"val_loss": result.val_losses[self.step]}
        scalars.update({f"val_loss/{tag_safe(name)}": loss for name, loss in per_channel.items()})
        scalars.update(rate_scalars(rates, "val_", self.cfg.logging.per_channel))  # a reward model's accuracy, margin
        self.logger.log_eval(self.step, scalars)

    def _account(self, out: StepResult, result: TrainResult) -> None:
        result.losses[self.step] = out.loss
        result.channels[self.step] = out.channels
        result.rates[self.step] = out.rates
        result.router_losses[self.step] = {k: v for k, v in out.moe.items() if k in ("moe_aux_loss", "moe_z_loss")}
        result.mtp_losses[self.step] = {k: v for k, v in out.moe.items() if k.startswith("mtp_loss/")}
        if not out.skipped:
            self.bad_in_a_row = 0
            return
        self.skipped += 1
        self.bad_in_a_row += 1
        self._print(f"step {self.step}: loss {out.loss} grad norm {out.grad_norm}: not finite, update skipped")
        if self.bad_in_a_row >= self.cfg.training.max_bad_steps:
            latest = self.checkpointer.latest()
            raise TrainingDiverged(
                f"{self.bad_in_a_row} consecutive steps had a NaN/Inf loss or gradient norm (training.max_bad_steps); "
                f"stopping. The last good checkpoint is {latest or 'none'}: lower optimizer.lr or raise training.z_loss"
            )

    def _print(self, message: str) -> None:
        if self.dims.is_logger:
            print(message, flush=True)


class _Window:
    """Sums over one log interval; logged losses are token-weighted over the interval's good steps."""

    def __init__(self, channel_names: list[str]):
        self.channel_names = channel_names
        self.loss_sum = self.tokens = self.processed = self.steps = self.seconds = 0.0
        self.grad_norm = 0.0
        self.channels: dict[int, list[float]] = {}
        self.moe: dict[str, float] = {}  # router losses, dropped assignments, expert loads: summed over steps
        self.rates: dict[str, dict[int, list[float]]] = {}  # reward accuracy, margin: channel -> [sum, pairs]

    def add(self, out: StepResult, seconds: float, processed_tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.processed += processed_tokens
        self.grad_norm = out.grad_norm
        for key, value in out.moe.items():
            self.moe[key] = self.moe.get(key, 0.0) + value
        if not out.skipped:
            self.loss_sum += out.loss * out.tokens
            self.tokens += out.tokens
            merge(self.channels, out.channels)
            for key, totals in out.rates.items():
                merge(self.rates.setdefault(key, {}), totals)

    def scalars(self, lr, consumed_tokens, skipped, flops_per_tok, peak, dims: ParallelDims, device) -> dict:
        tokens_per_s = self.processed / self.seconds if self.seconds else 0.0
        out = {
            "loss": self.loss_sum / self.tokens if self.tokens else float("nan"),
            "lr": lr,
            "grad_norm": self.grad_norm,
            "tokens": consumed_tokens,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * self.seconds / self.steps,
        }
        for c, (loss_sum, tokens) in sorted(self.channels.items()):  # channels absent in the interval: not logged
            name = tag_safe(self.channel_names[c])
            out[f"loss/{name}"] = loss_sum / tokens
            out[f"tokens/{name}"] = tokens
        out.update({key: value / self.steps for key, value in self.moe.items()})  # means over the interval's steps
        for key, totals in self.rates.items():  # pair-weighted over the interval, overall and per channel
            if not totals:  # a rank before the last pipeline stage sees no scores
                continue
            out[key] = sum(v for v, _ in totals.values()) / sum(n for _, n in totals.values())
            out.update({f"{key}/{tag_safe(self.channel_names[c])}": v / n for c, (v, n) in sorted(totals.items())})
        if skipped:
            out["skipped_steps"] = skipped
        if peak:
            out["mfu"] = flops_per_tok * tokens_per_s / (peak * dims.world_size)
        if device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
