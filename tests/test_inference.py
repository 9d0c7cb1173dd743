"""Using a trained model (megatron_llm.LLM) against transformers on tiny random models in fp32: greedy
generation token for token for batches of unequal prompts (KV cache, left padding, sliding windows,
soft-caps), streaming, stop rules, the probes against output_hidden_states and eager output_attentions,
and a model spread over devices."""

import pytest
import torch
import transformers

import megatron_llm
from conftest import perturb_norms_and_biases
from megatron_llm.errors import UsageError

EOD = 256  # the byte tokenizer's end of document: a stop token
SMALL = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=EOD)
CASES = {
    "llama": {},
    "qwen3": dict(head_dim=24),
    "gemma2": dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "gpt_neox": dict(num_key_value_heads=None, rotary_pct=0.5, use_parallel_residual=True),
    # latent attention whose values (8 wide) are narrower than its query/key heads (16 + 8): cached at their own width
    "youtu": dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=8),
}
PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [100, 101, 102], [119, 111, 114, 108, 100]]  # unequal lengths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(model_type):
        if model_type not in built:
            config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in {**SMALL, **CASES[model_type]}.items()
                                                                       if v is not None})
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(config).eval()
            perturb_norms_and_biases(hf)
            path = tmp_path_factory.mktemp(model_type)
            hf.save_pretrained(path)
            built[model_type] = (megatron_llm.LLM.load(str(path)), hf)
        return built[model_type]

    return get


def hf_greedy(hf, prompts, new_tokens):
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                      eos_token_id=EOD)[:, longest:].tolist()
    return [row[: row.index(EOD) + 1] if EOD in row else row for row in out]  # each row up to its stop token


@pytest.mark.parametrize("model_type", CASES)
def test_greedy_generate_equals_transformers(models, model_type):
    llm, hf = models(model_type)
    assert llm.generate(PROMPTS, max_new_tokens=16) == hf_greedy(hf, PROMPTS, 16)


def test_stream_pieces_join_to_generate(models):
    llm, _ = models("llama")
    prompt = "naïve café ☕ "  # multi-byte characters in the prompt; the model's bytes may form more
    pieces = list(llm.stream_generate(prompt, max_new_tokens=24))
    assert "".join(pieces) == llm.generate(prompt, max_new_tokens=24)
    assert all(not piece.endswith("\ufffd") for piece in pieces[:-1])  # no character split across pieces


def test_sampling_is_seeded_and_stops(models):
    llm, _ = models("llama")
    a = llm.generate(PROMPTS, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert a == llm.generate(PROMPTS, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    first = a[0][0]
    assert llm.generate([PROMPTS[0]], max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3,
                        stop=[first]) == [[first]]  # a stop token id ends the row, kept in the ids
    with pytest.raises(UsageError, match="stop must be a list"):
        llm.generate(PROMPTS, stop="x")
    with pytest.raises(UsageError, match="exceeds the model's context of 64"):
        llm.generate([list(range(60))], max_new_tokens=8)


def test_probes_match_transformers(models):
    llm, hf = models("gemma2")
    text = [5, 80, 33, 17, 99, 12, 64, 2, 45, 8]  # longer than the window of 6
    with torch.no_grad():
        out = hf(torch.tensor([text]), output_hidden_states=True, output_attentions=True)
    for layer in (0, 1):
        attentions = out.attentions[layer][0]  # [heads, s, s], with gemma2's window and soft-cap
        weights = llm.show_attention(text, layer, 9, 5)
        torch.testing.assert_close(torch.tensor([weights[f"head {h}"] for h in range(4)]), attentions[:, 9, 5])
    assert llm.show_attention(text, 0, 9, 2)["mean"] == 0.0  # outside layer 0's window
    hidden = out.hidden_states  # [embeddings, after layer 0, after layer 1 (final norm applied)]
    expected = 1 - torch.nn.functional.cosine_similarity(hidden[0][0], hidden[1][0], dim=-1)
    torch.testing.assert_close(torch.tensor(llm.show_cos_distance(text, 0)), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lens = hf.lm_head(hf.model.norm(hidden[1][:, -1]))
        lens = (torch.tanh(lens / 3.0) * 3.0).softmax(-1)[0]
    top = lens.topk(5)
    pairs = llm.show_topk_token(text, 0, k=5)
    assert [t for t, _ in pairs] == [llm.tokenizer.decode([i]) for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([p for _, p in pairs]), top.values, atol=1e-6, rtol=1e-5)


def test_spread_over_devices_keeps_outputs(models):
    llm, _ = models("qwen3")
    before = llm.generate(PROMPTS, max_new_tokens=8)
    llm.set_device(["cpu", "cpu"])  # the hooks that carry hidden states and context across a boundary run
    assert llm.generate(PROMPTS, max_new_tokens=8) == before


def test_tools_generate_and_inspect_run_from_the_command_line(models, tmp_path, capsys):
    """The two tools' command lines, run in this process (their own imports cost seconds in a subprocess)."""
    import importlib.util

    from conftest import ROOT

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    llm, hf = models("llama")
    hf.save_pretrained(tmp_path / "model")
    assert tool("generate").main(["--model", str(tmp_path / "model"), "--prompt", "Hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Hello" + llm.generate("Hello", max_new_tokens=8))
    args = ["--model", str(tmp_path / "model"), "--text", "def f():", "--layer", "1", "--output", str(tmp_path / "p" / "i.png")]
    assert tool("inspect_model").main(args) == 0
    assert (tmp_path / "p" / "i.png").stat().st_size > 10_000
    assert tool("inspect_model").main(args[:5] + ["7"] + args[6:]) == 2  # one line: no such layer


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "youtu"])
def test_continuous_batching_equals_each_prompt_alone(models, model_type):
    """Slots refilled as sequences finish (prompts prefilled together, rows of different lengths in one cache,
    a window included, each request its own max_new_tokens) give every prompt what generate gives it alone;
    so does one static batch with a limit per row."""
    llm, _ = models(model_type)
    prompts = PROMPTS + [[9] * 11, [3], [40, 41, 42, 43, 44, 45]]
    limits = [14, 3, 14, 9, 1, 14, 6][: len(prompts)]
    stop = [llm.generate(PROMPTS[0], max_new_tokens=4)[1]]  # a token some rows produce: lengths differ
    alone = [llm.generate([p], max_new_tokens=n, stop=stop)[0] for p, n in zip(prompts, limits)]
    requests = [(i, p, n) if n != 14 else (i, p) for i, (p, n) in enumerate(zip(prompts, limits))]  # 14: the default
    batched = dict(llm.batched(requests, batch_size=2, max_new_tokens=14, stop=stop))
    assert [batched[i] for i in range(len(prompts))] == alone
    assert llm.generate(prompts, max_new_tokens=limits, stop=stop) == alone
    assert len({len(a) for a in alone}) > 2
    with pytest.raises(UsageError, match="one per prompt"):
        llm.generate(prompts, max_new_tokens=limits[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_rotation_is_bit_equal_to_training_ops(dtype):
    """Without autograd, rotate-half takes the rolled tables (the decoding fast path): it must give the very
    bits of the rotation training runs, partial rotary included."""
    from megatron_llm.model.attention import AttentionContext
    from megatron_llm.model.rope import apply_rope, rope_tables

    torch.manual_seed(0)
    cos, sin = rope_tables(16, 64, 10000.0, None, "cpu")
    positions = torch.tensor([[3, 9, 17, 40, 63]] * 3)
    for head_dim in (16, 24):  # whole and partial rotary
        q, k = ((torch.randn(3, 5, heads, head_dim) * 3).to(dtype) for heads in (4, 2))  # rotated joined: 6 heads
        expected = [apply_rope(x.requires_grad_(), cos[positions], sin[positions]).detach() for x in (q, k)]
        with torch.no_grad():
            rotated = AttentionContext({"global": (cos, sin)}, positions).rotate("global", False, q, k)
        assert all(torch.equal(a, b) for a, b in zip(rotated, expected, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_norm_is_bit_equal_to_training_ops(dtype):
    """Under inference_mode RMSNorm runs torch's rms_norm (one call): it must give the very bits of the
    ops training runs (Hugging Face's order), with a weight, a unit-offset weight (Gemma) and none."""
    from megatron_llm.model.norms import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 300) * torch.rand(3, 5, 1) * 10).to(dtype)  # 300: a mean that is no power-of-2 division
    for affine, unit_offset in ((True, False), (True, True), (False, False)):
        norm = RMSNorm(300, 1e-6, affine, unit_offset).to(dtype)
        if affine:
            torch.nn.init.normal_(norm.weight)
        with torch.no_grad():
            expected = norm(x)
        with torch.inference_mode():
            assert torch.equal(norm(x), expected), (affine, unit_offset)
