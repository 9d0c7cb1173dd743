"""Many prompts, many workers: `Infer(model, data, output, num_workers).run()` and tools/infer.py.

Reads jsonl prompts (a `prompt` string or token-id list, or chat `messages`; optionally the line's own
`max_new_tokens`), generates with `num_workers` model replicas (processes) that share the devices and the
CPU cores, each decoding with continuous batching, and writes jsonl results in input order, every input's
fields kept plus `output`.

Nothing finished is lost: each worker appends its results, one flushed line at a time, to its own part
file beside the output; a rerun reads the parts (dropping a line torn by a crash), skips the ids they
hold and gives the rest out again, so a killed run or a dead worker only delays the prompts it held.
The output appears complete or not at all (written under a temporary name, then renamed). Under torchrun
(several nodes), each node takes every WORLD_SIZE-th prompt and rank 0 merges.

Several CPU workers of one node share one copy of the weights: the process that checks the prompts loads the
checkpoint once into shared memory and every worker maps it (inference/shared_weights.py says how, and why
not by forking the workers from a loaded process). A GPU worker, or a lone CPU worker, loads its own.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_llm.errors import UsageError
from megatron_llm.paths import writable_directory, write_atomically

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"  # each message on its own line; the reply follows "assistant: "


@dataclass
class Generation:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop: Optional[list] = None
    seed: Optional[int] = None


@dataclass
class Infer:
    model_path: str
    data_path: str
    output_path: str
    num_workers: int = 1
    devices: Optional[list[str]] = None  # split among the workers in order; None: CPU
    batch_size: int = 8  # sequences each worker decodes at once
    generation: Generation = field(default_factory=Generation)
    tokenizer: Optional[str] = None
    dtype: str = "fp32"
    # filled by run(): per worker, seconds from its start to its model loaded, and from then to its last result
    timings: list[WorkerTiming] = field(default_factory=list, init=False, repr=False)

    def run(self) -> Path:
        records = read_prompts(Path(self.data_path))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device_sets = worker_devices(self.devices, self.num_workers)
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {self.batch_size}")
        if not Path(self.model_path).exists():
            raise UsageError(f"model {self.model_path} not found")
        output = checked_output(Path(self.output_path), Path(self.data_path))
        parts = output.with_name(output.name + ".parts")
        created = not parts.exists()
        parts.mkdir(parents=True, exist_ok=True)
        drop_torn_lines(parts, rank)
        done = finished(parts)
        mine = [r for i, r in enumerate(records) if i % world == rank and r["_id"] not in done]
        shares = balanced_shares(mine, self.num_workers, self.generation.max_new_tokens)
        started = time.time()
        threads = self._threads()
        context = _worker_context(self.model_path, threads)
        weights = _shared_weights(self.devices, shares)
        # Every prompt is checked in a process of its own, forked like the workers, so that this one imports no
        # torch (seconds of CPU that a loaded machine takes from the workers' start); when the CPU workers
        # share their weights, it then loads them. A worker loading its own model does so meanwhile; each
        # generates once the check passes; they are stopped if it fails.
        verdict, go = context.SimpleQueue(), context.Event()
        checker = context.Process(target=_prepare, name="prompt check" + (" and model load" if weights else ""), args=(
            records, self.model_path, self.tokenizer, self.generation, self.devices, self.dtype, weights,
            threads * self.num_workers, verdict))
        checker.start()
        procs, timings = self._start_workers(context, shares, parts, rank, device_sets, started, go, weights)
        if weights:
            os.close(weights.fd)  # the processes hold their own descriptors: the memory goes with the last one
        try:
            _raise_refusal(checker, verdict)
        except UsageError:
            for proc in procs:
                proc.terminate()
                proc.join()
            if created and not any(parts.iterdir()):
                parts.rmdir()
            raise
        go.set()
        if procs:
            self._wait(procs, parts, len(mine))
            self.timings = [WorkerTiming(*timings.get()) for p in procs if p.exitcode == 0]
        if world > 1:
            _barrier()
        if rank == 0:
            merge(records, parts, output)
        return output

    def _threads(self) -> int:
        """Each worker's torch threads: the workers split this process's cores, never oversubscribe."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.num_workers)

    def _start_workers(self, context, shares: list[list[dict]], parts: Path, rank: int,
                       device_sets: list[Optional[list[str]]], started: float, go, weights):
        """(worker processes, the queue of their timings); they generate once `go` is set."""
        procs, timings = [], context.SimpleQueue()
        for w, share in enumerate(shares):
            if not share:
                continue
            part = parts / f"node{rank}-worker{w}.jsonl"
            args = (self.model_path, share, str(part), device_sets[w], self._threads(), asdict(self.generation),
                    self.batch_size, self.tokenizer, self.dtype, weights, go, timings, started)
            proc = context.Process(target=_worker, args=args, name=f"worker {w}")
            proc.start()
            procs.append(proc)
        return procs, timings

    def _wait(self, procs: list, parts: Path, total: int) -> None:
        from megatron_llm.logging.progress import Progress

        progress = Progress("infer", total, "prompts", every_s=10.0)
        before = len(finished(parts))
        while any(p.is_alive() for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)  # back as soon as they end
            progress.update(len(finished(parts)) - before)
        progress.update(len(finished(parts)) - before)
        progress.close()
        dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
        if dead:
            raise UsageError(f"{', '.join(dead)} died; what finished is kept in {parts}: run the same command again "
                             "to finish the rest")


@dataclass
class WorkerTiming:
    startup_s: float  # from the run's start to the worker's model loaded and the prompts' check passed
    generate_s: float  # from the model loaded to the last result written
    ready_at: float  # wall-clock time (time.time()) when the model was loaded
    generate_cpu_s: float  # CPU seconds the worker's threads spent generating: its work, whatever else runs
    weights_file: str  # the file its weights are mapped from, with its inode: one memfd for all when shared


# What every worker imports, once, in the fork server: the model and generation code (not training's parallel
# package, DCP or torch._dynamo). WORKER_DCP is added when the checkpoint is a native (DCP) one.
WORKER_MODULES = ["megatron_llm.inference.infer", "megatron_llm.inference.llm", "megatron_llm.inference.shared_weights"]
WORKER_DCP = "megatron_llm.checkpoint.safe_dcp"


def _worker_context(model_path: str, threads: int):
    """The multiprocessing context workers start from: a fork server, started now so that it imports torch and
    WORKER_MODULES once. A spawned worker paid those imports itself (2-4 s each, three processes importing at once
    on two cores with 2 workers, and this one a fourth for the prompts' check); a forked one starts with them done.
    Workers are not forked from this process: it may have run torch ops on several OpenMP threads (a test
    suite, a notebook), and a child of such a process hangs in its first multi-threaded op (GNU OpenMP is not
    fork-safe); the server never runs one. Its environment is every worker's: OpenMP/MKL thread counts are set
    before it imports torch (torch.set_num_threads in the worker then sets the count of each run)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    native = any((Path(model_path) / name).is_file() for name in (".metadata", "latest"))  # as detect_format tells it
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES + ([WORKER_DCP] if native else []))
    with _thread_env(threads):
        forkserver.ensure_running()  # a server this process started before is reused, imports done
    return context


def generating_span(timings: list[WorkerTiming]) -> float:
    """Seconds from the first worker's model loaded to the last worker's last result."""
    return max(t.ready_at + t.generate_s for t in timings) - min(t.ready_at for t in timings)


class SharedFile:
    """A file descriptor that travels to a process started by multiprocessing with its arguments (duplicated
    into the child: sent to the fork server with the arguments, inherited by a fork)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _received, (DupFd(self.fd),)


def _received(dup) -> SharedFile:
    return SharedFile(dup.detach())


def _shared_weights(devices: Optional[list[str]], shares: list[list[dict]]) -> Optional[SharedFile]:
    """The nameless memory file the CPU workers share their weights through (inference/shared_weights.py), when
    more than one starts; else None."""
    if devices or sum(1 for share in shares if share) < 2 or not hasattr(os, "memfd_create"):
        return None
    return SharedFile(os.memfd_create("megatron_llm weights"))


def _prepare(records: list[dict], model_path: str, tokenizer: Optional[str], generation: Generation,
             devices: Optional[list[str]], dtype: str, weights, threads: int, verdict) -> None:
    """The sampling settings and devices checked, check_lengths, then (given the workers' shared `weights`) the
    model loaded into them, on `threads` (the workers wait, and this process forks nothing), in a process of its
    own: puts a refusal's message on `verdict`, or None."""
    try:
        from megatron_llm.inference.devices import usable_device
        from megatron_llm.inference.generate import Sampling

        g = generation
        Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, seed=g.seed)  # refuses what a worker would
        for device in devices or ():
            usable_device(device)
        check_lengths(records, model_path, tokenizer, g.max_new_tokens)
        if weights:
            import torch

            from megatron_llm.inference.llm import DTYPES
            from megatron_llm.inference.shared_weights import load_shared

            torch.set_num_threads(threads)
            load_shared(model_path, DTYPES[dtype], weights.fd)
    except UsageError as e:
        verdict.put(str(e))
        return
    verdict.put(None)


def _raise_refusal(checker, verdict) -> None:
    """The prompts' check's refusal as a UsageError, once the checker ends; nothing if every prompt passed."""
    checker.join()
    message = None if verdict.empty() else verdict.get()
    if message is not None:
        raise UsageError(message)
    if checker.exitcode != 0:
        raise UsageError(f"the {checker.name} died (exit code {checker.exitcode}); run the same command again")


def _worker(model_path, records, part, devices, threads, generation, batch_size, tokenizer, dtype, weights, go,
            timings, started: float) -> None:
    import torch

    from megatron_llm.checkpoint.convert import checkpoint_model_config
    from megatron_llm.inference import shared_weights
    from megatron_llm.inference.llm import DTYPES, LLM

    torch.set_num_threads(threads)
    if weights:
        cfg = checkpoint_model_config(model_path)
        go.wait()  # every prompt passed the check and the weights are loaded
        llm = LLM.around(shared_weights.map_shared(model_path, cfg, DTYPES[dtype], weights.fd), model_path, tokenizer)
        os.close(weights.fd)  # the mapping keeps the memory
    else:
        try:
            llm = LLM.load(model_path, device=devices[0] if devices else "cpu", dtype=dtype, tokenizer=tokenizer)
            if devices and len(devices) > 1:
                llm.set_device(devices)
        except UsageError:
            go.wait()  # the prompts' check refuses the same input in one line and stops this worker meanwhile
            raise
        go.wait()  # every prompt passed the check
    ready, cpu = time.time(), time.process_time()
    by_key = {r["_id"]: r for r in records}
    default = generation["max_new_tokens"]
    prompts = [(r["_id"], prompt_ids(llm.tokenizer, r), r.get("max_new_tokens", default)) for r in records]
    with open(part, "a", encoding="utf-8") as out:
        for key, ids in llm.batched(prompts, batch_size=batch_size, **generation):
            record = by_key[key]
            text_prompt = isinstance(record.get("prompt"), str) or "messages" in record
            result = {**record, "output": llm.decode(ids) if text_prompt else ids}
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()  # a crash tears at most the line being written
    weights_file = shared_weights.mapped_file(llm.model.tok_embeddings.weight)
    timings.put((ready - started, time.time() - ready, ready, time.process_time() - cpu, weights_file))


def balanced_shares(records: list[dict], workers: int, max_new_tokens: int) -> list[list[dict]]:
    """The records dealt to workers by their decoding work (max_new_tokens, the line's or the default):
    the largest first, each to the least loaded worker; each share keeps input order. By count alone, one
    worker can draw most of the long requests and finish alone."""
    def work(r: dict) -> int:
        return r.get("max_new_tokens", max_new_tokens)

    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for index in sorted(range(len(records)), key=lambda i: -work(records[i])):
        w = loads.index(min(loads))
        loads[w] += work(records[index])
        shares[w].append(index)
    return [[records[i] for i in sorted(share)] for share in shares]


@contextlib.contextmanager
def _thread_env(threads: int):
    """The fork server's (so every worker's) OpenMP/MKL thread counts, set before it imports torch (and by
    torch.set_num_threads in the worker after): no pool is ever sized for all the cores. OpenMP threads wait
    passively unless the user chose otherwise: on a loaded machine a 2-thread worker spinning at each op's
    barrier took 38-68 s for work that took it 4-8 s passively (and 1 thread 4-7 s)."""
    values = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def prompt_ids(tokenizer, record: dict) -> list[int]:
    if "messages" in record:
        text = "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in record["messages"]) + "assistant: "
        return tokenizer.encode(text)
    prompt = record["prompt"]
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def check_lengths(records: list[dict], model_path: str, tokenizer: Optional[str], max_new_tokens: int) -> None:
    """Refuses, before any worker starts, a prompt that with max_new_tokens does not fit the model's context, or
    holds token ids the model does not have."""
    from megatron_llm.checkpoint.convert import checkpoint_model_config
    from megatron_llm.data.tokenizer import load_tokenizer
    from megatron_llm.inference.llm import tokenizer_of

    cfg = checkpoint_model_config(model_path)
    tok = load_tokenizer(tokenizer or tokenizer_of(Path(model_path), cfg.vocab_size))
    for record in records:
        ids = prompt_ids(tok, record)
        n, new_tokens = len(ids), record.get("max_new_tokens", max_new_tokens)
        if any(not 0 <= t < cfg.vocab_size for t in ids):  # token ids given, or a tokenizer larger than the model
            raise UsageError(f"prompt id {record['_id']} holds token ids outside the model's vocabulary of "
                             f"{cfg.vocab_size}: give text, or ids the model was trained with")
        if n == 0 or n + new_tokens > cfg.max_seq_len:
            raise UsageError(f"prompt id {record['_id']} has {n} tokens; with max_new_tokens {new_tokens} it "
                             f"must fit the model's context of {cfg.max_seq_len} (and not be empty)")


def checked_output(output: Path, data: Path) -> Path:
    """`output`, refused before any work where the results could not be written there or would replace the
    prompts; its directory is created when missing."""
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory: give the file to write, like {output / 'results.jsonl'}")
    if output.resolve() == data.resolve():
        raise UsageError(f"--output {output} is the prompt file --data: the results would replace it; choose another file")
    writable_directory(str(output.parent), "the directory of --output")
    return output


def read_prompts(path: Path) -> list[dict]:
    """The input records, each with its `_id` (its `id` field, else its line number); bad lines are refused."""
    if not path.is_file():
        raise UsageError(f"prompt file {path} {'is a directory' if path.is_dir() else 'not found'}: pass a jsonl file")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{number} is not UTF-8 text; save the file as UTF-8") from None
            except ValueError:
                raise UsageError(f"{path}:{number} is not a JSON object; fix the line") from None
            if not isinstance(record, dict) or not (_is_prompt(record.get("prompt")) or _is_chat(record.get("messages"))):
                raise UsageError(f"{path}:{number} has no 'prompt' (string or token ids) or chat 'messages' "
                                 "(a list of {role, content}); add one")
            limit = record.get("max_new_tokens", 1)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise UsageError(f"{path}:{number} has a 'max_new_tokens' that is not a positive integer")
            key = record.get("id", number)
            if not isinstance(key, (str, int)):
                raise UsageError(f"{path}:{number} has an 'id' that is not a string or an integer")
            records.append({**record, "_id": key})
    if not records:
        raise UsageError(f"prompt file {path} holds no prompts: pass the jsonl file of the prompts")
    if len({r["_id"] for r in records}) != len(records):
        raise UsageError(f"{path} repeats an id: give every line a distinct 'id' (or none, to use line numbers)")
    return records


def _is_prompt(prompt) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt))


def _is_chat(messages) -> bool:
    return isinstance(messages, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)


def finished(parts: Path) -> dict:
    """id -> result, from the complete lines of the part files (a line torn by a crash is dropped)."""
    results = {}
    for part in sorted(parts.glob("*.jsonl")):
        for result in _complete_lines(part):
            results[result.pop("_id")] = result
    return results


def drop_torn_lines(parts: Path, rank: int) -> None:
    """Rewrites this node's part files with their complete lines only, so that appending starts a fresh line
    (other nodes' files are theirs to mend: they may be writing them)."""
    for part in sorted(parts.glob(f"node{rank}-*.jsonl")):
        tmp = part.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _complete_lines(part)), encoding="utf-8")
        os.replace(tmp, part)


def _complete_lines(part: Path) -> list[dict]:
    out = []
    for line in part.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the line a crash tore
    return out


def merge(records: list[dict], parts: Path, output: Path) -> None:
    """The output in input order, written under a temporary name and renamed; the parts removed after."""
    results = finished(parts)
    missing = [r["_id"] for r in records if r["_id"] not in results]
    if missing:
        raise UsageError(f"{len(missing)} prompts have no result (first: id {missing[0]}); run the same command again")
    write_atomically(output, "".join(json.dumps(results[record["_id"]], ensure_ascii=False) + "\n" for record in records))
    shutil.rmtree(parts)


def worker_devices(devices: Optional[list[str]], workers: int) -> list[Optional[list[str]]]:
    """Each worker's devices: one each, or an equal share each (8 GPUs, 2 workers: 4 each); None on CPU."""
    if workers < 1:
        raise UsageError(f"num_workers must be positive, got {workers}")
    if not devices:
        return [None] * workers
    if len(devices) < workers or len(devices) % workers:
        raise UsageError(f"{workers} workers cannot share {len(devices)} devices equally: use a divisor of "
                         f"{len(devices)} workers, or more devices")
    share = len(devices) // workers
    return [devices[w * share : (w + 1) * share] for w in range(workers)]


def _barrier() -> None:
    """All nodes' workers done before rank 0 merges (gloo, only for this)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    from megatron_llm.errors import ArgumentParser

    p = ArgumentParser(description="Generate for every prompt of a jsonl file with several workers.")
    p.add_argument("--model", required=True, help="checkpoint directory (native, Hugging Face or Megatron-LM)")
    p.add_argument("--data", required=True, help="jsonl with a 'prompt' (text or token ids) or chat 'messages' per line")
    p.add_argument("--output", required=True, help="jsonl to write, in input order (a rerun resumes)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--devices", nargs="*", default=None, help="e.g. cuda:0 cuda:1 (default: CPU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", nargs="*", default=None, help="stop strings")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    a = p.parse_args(argv)
    generation = Generation(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.stop, a.seed)
    infer = Infer(a.model, a.data, a.output, a.num_workers, a.devices, a.batch_size, generation, a.tokenizer, a.dtype)
    try:
        out = infer.run()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for t in infer.timings:
        print(f"worker: {t.startup_s:.1f} s to start and load the model, {t.generate_s:.1f} s generating "
              f"({t.generate_cpu_s:.1f} s of CPU)")
    if infer.timings:
        print(f"generating: {generating_span(infer.timings):.2f} s from the first worker's model loaded to the last "
              "result")
    shared = {t.weights_file for t in infer.timings}
    if len(infer.timings) > 1 and len(shared) == 1 and "" not in shared:
        print("the workers shared one copy of the weights, loaded once")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {out}")
    return 0
