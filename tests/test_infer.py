"""Many prompts, many workers: Infer writes one result per prompt in input order with the input's fields kept;
2 workers (sharing one copy of the weights) and 2 torchrun nodes give exactly 1 worker's greedy outputs; a rerun after a crash keeps what
finished, drops a torn line and completes the rest; a killed worker is named and its prompts are done by the
rerun; bad input is one line, exit 2, nothing written."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
import transformers

from conftest import ROOT, free_port
from megatron_llm.errors import UsageError
from megatron_llm.inference.infer import Generation, Infer, finished

PROMPTS = ["def main(", "import os\n", "class A:", "# a comment", "x = [1, 2", "while True:", "print(", "if x:"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    lines = [{"prompt": p, "source": f"s{i}"} for i, p in enumerate(PROMPTS)]
    lines[3] = {"id": "chat", "messages": [{"role": "user", "content": "hi"}]}
    lines[5]["max_new_tokens"] = 3  # a request's own limit, as a server takes it
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    one = Infer(str(root / "model"), str(root / "prompts.jsonl"), str(root / "one.jsonl"), num_workers=1,
                batch_size=3, generation=Generation(max_new_tokens=12)).run()
    return root, [json.loads(line) for line in one.read_text().splitlines()]


def test_one_worker_keeps_order_and_fields(setup):
    root, results = setup
    assert [r.get("source") for r in results] == [f"s{i}" if i != 3 else None for i in range(len(PROMPTS))]
    assert results[3]["id"] == "chat" and all(isinstance(r["output"], str) for r in results)
    assert len(results[5]["output"]) <= 3 < max(len(r["output"]) for r in results)  # 3 bytes: at most 3 characters
    assert not (root / "one.jsonl.parts").exists()


def test_two_workers_equal_one(setup):
    root, results = setup
    infer = Infer(str(root / "model"), str(root / "prompts.jsonl"), str(root / "two.jsonl"), num_workers=2,
                  batch_size=2, generation=Generation(max_new_tokens=12))
    out = infer.run()
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    assert len(infer.timings) == 2 and all(t.startup_s > 0 and t.generate_s > 0 for t in infer.timings)
    # one copy of the weights: both workers' embedding lies in the same memory file (inode), loaded once
    shared = {t.weights_file for t in infer.timings}
    assert len(shared) == 1 and shared.pop().startswith("/memfd:megatron_llm weights"), infer.timings


def test_rerun_after_a_crash_completes(setup):
    root, results = setup
    parts = root / "resumed.jsonl.parts"
    parts.mkdir()
    kept = dict(results[0], _id=1, output="kept from the first run")
    (parts / "node0-worker0.jsonl").write_text(json.dumps(kept) + "\n" + '{"_id": 2, "outp')  # torn by a kill
    out = Infer(str(root / "model"), str(root / "prompts.jsonl"), str(root / "resumed.jsonl"),
                generation=Generation(max_new_tokens=12)).run()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0]["output"] == "kept from the first run" and got[1:] == results[1:]


def test_a_killed_worker_is_named_and_the_rerun_completes(setup):
    """Worker 1 is killed (SIGKILL, as the OOM killer does) as soon as it has started: the run names it and keeps
    worker 0's results; the same run again does worker 1's prompts, and the output is 1 worker's."""
    root, results = setup
    infer = Infer(str(root / "model"), str(root / "prompts.jsonl"), str(root / "killed.jsonl"), num_workers=2,
                  batch_size=2, generation=Generation(max_new_tokens=12))

    def kill_worker_1():
        while not (workers := [p for p in multiprocessing.active_children() if p.name == "worker 1"]):
            threading.Event().wait(0.001)
        os.kill(workers[0].pid, signal.SIGKILL)  # while it loads the model: long before its first result

    killer = threading.Thread(target=kill_worker_1)
    killer.start()
    with pytest.raises(UsageError, match=r"^worker 1 \(exit code -9\) died; what finished is kept in .*killed\.jsonl\.parts"):
        infer.run()
    killer.join()
    kept = finished(root / "killed.jsonl.parts")
    assert 0 < len(kept) < len(PROMPTS)  # worker 0's share
    assert [json.loads(line) for line in infer.run().read_text().splitlines()] == results


def test_two_nodes_under_torchrun_equal_one(setup):
    root, results = setup
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "tools" / "infer.py"), "--model", str(root / "model"), "--data", str(root / "prompts.jsonl"),
               "--output", str(root / "nodes.jsonl"), "--max-new-tokens", "12", "--batch-size", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line) for line in (root / "nodes.jsonl").read_text().splitlines()] == results


def test_a_worker_imports_no_training_machinery(setup):
    """What a worker imports (the fork server's modules) and loading a Hugging Face model pull in neither
    torch._dynamo nor DCP, FSDP, pipelining or our parallel package: about 2 s of start-up, in every worker."""
    root, _ = setup
    heavy = ("torch._dynamo", "torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp",
             "torch.distributed.pipelining", "megatron_llm.parallel")
    code = ("import sys; from megatron_llm.inference import infer; [__import__(m) for m in infer.WORKER_MODULES]; "
            f"from megatron_llm.inference.llm import LLM; LLM.load(sys.argv[1]); "
            f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))")
    done = subprocess.run([sys.executable, "-c", code, str(root / "model")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_command_imports_no_torch():
    """The command's own process (reading prompts, creating the workers' shared weights file, waiting, merging)
    imports no torch: seconds of CPU a loaded machine would take from the workers' start."""
    code = ("import sys; from megatron_llm.inference import infer; "
            "assert infer._shared_weights(None, [[{}], [{}]]) is not None; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


@pytest.mark.parametrize("line,message", [
    ('{"text": "no prompt"}', "prompts.jsonl:1 has no 'prompt'"),
    ('not json', "prompts.jsonl:1 is not a JSON object"),
    ('{"prompt": "' + "x" * 70 + '"}', "has 70 tokens; with max_new_tokens 12 it must fit the model's context of 64"),
    ('{"prompt": "x", "max_new_tokens": 64}', "has 1 tokens; with max_new_tokens 64 it must fit"),
    ('{"prompt": "x", "max_new_tokens": "5"}', "prompts.jsonl:1 has a 'max_new_tokens' that is not a positive integer"),
])
def test_bad_input_is_one_line(setup, tmp_path, line, message):
    root, _ = setup
    (tmp_path / "prompts.jsonl").write_text(line + "\n")
    with pytest.raises(UsageError, match=message):
        Infer(str(root / "model"), str(tmp_path / "prompts.jsonl"), str(tmp_path / "out.jsonl"),
              generation=Generation(max_new_tokens=12)).run()
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.parts").exists()  # workers stopped
    with pytest.raises(UsageError, match="3 workers cannot share 2 devices"):
        Infer(str(root / "model"), str(root / "prompts.jsonl"), str(tmp_path / "x.jsonl"), num_workers=3,
              devices=["cpu", "cpu"]).run()
