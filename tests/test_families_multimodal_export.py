"""A language model written back into its multimodal checkpoint (convert --vision-from, HFWriter's `into`): a tiny
random transformers model of a wrapper in each stored layout (LLaVA's language_model., Qwen3-VL-MoE's
model.language_model. + lm_head, Qwen2-VL's model. beside visual.), its language model changed, converted to ours and
written back; transformers' wrapper class must load the result strictly and give the changed model's logits, on text
and on an image."""

import copy
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_llm import load_model
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families.multimodal import text_config, unwrap, wrap_config
from megatron_llm.checkpoint.hf import export_hf_config, model_config_from_hf
from megatron_llm.checkpoint.hf_io import SINGLE
from test_convert import run_cli
from test_families_multimodal import GEMMA3_4B, GLM41V_9B, LLAVA_15, QWEN2_VL_7B, QWEN3_VL_30B, VOCAB, multimodal_model

IMAGE = VOCAB - 1  # the image token of every case
PROCESSOR = {"preprocessor_config.json": '{"image_processor_type": "tiny"}', "chat_template.jinja": "{{ messages }}"}


def image_inputs(model) -> dict:
    """Text around one 2x2-patch image (4 image tokens, each wrapper merging nothing), as its processor gives it:
    pixels for a CLIP-style tower, flattened patches with their grid and token types for Qwen-VL's."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB - 2, (1, 10), generator=generator)
    x[0, 2:6] = IMAGE
    vision = model.config.vision_config
    if hasattr(vision, "temporal_patch_size"):
        patch = 3 * vision.temporal_patch_size * vision.patch_size**2
        return dict(input_ids=x, pixel_values=torch.randn(4, patch, generator=generator),
                    image_grid_thw=torch.tensor([[1, 2, 2]]), mm_token_type_ids=(x == IMAGE).long())
    return dict(input_ids=x, pixel_values=torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator))


def tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / SINGLE, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_same_tensors(written, expected):
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


@pytest.mark.parametrize("wrapper", ["llava", "qwen3_vl_moe", "qwen2_vl"])
def test_language_model_written_back_into_its_multimodal_checkpoint(wrapper, tmp_path, capsys):
    model = multimodal_model(wrapper)
    model.save_pretrained(tmp_path / "vl")
    for name, text in PROCESSOR.items():
        (tmp_path / "vl" / name).write_text(text)
    # The language model changed as a fine-tune would (every tensor of it), read as ours, written back into the
    # unchanged checkpoint through the command line (unchanged, every wrapper comes back bit for bit: in
    # test_families_multimodal.py).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("model.language_model.", "lm_head.")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "tuned")
    vl, tuned = tensors(tmp_path / "vl"), tensors(tmp_path / "tuned")
    config = json.loads((tmp_path / "vl" / "config.json").read_text())
    language = set(unwrap(config, list(vl)).stored.values())
    assert {name for name in vl if not torch.equal(vl[name], tuned[name])} == language
    convert(str(tmp_path / "tuned"), "hf", str(tmp_path / "tuned_native"), "native")
    code, out, err = run_cli(capsys, "--input", tmp_path / "tuned_native", "--input-format", "native", "--output",
                             tmp_path / "back", "--output-format", "hf", "--output-family", wrapper, "--vision-from",
                             tmp_path / "vl")
    assert code == 0, err
    assert f"into {wrapper}" in out
    assert_same_tensors(tensors(tmp_path / "back"), tuned)  # its language model ours, the rest vl's
    assert all((tmp_path / "back" / name).read_text() == text for name, text in PROCESSOR.items())

    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "back", attn_implementation="eager", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert type(loaded) is type(model)
    x = torch.randint(0, VOCAB - 2, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(str(tmp_path / "tuned_native"))(x)
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)
        image = image_inputs(model)
        want = model(**image).logits
        torch.testing.assert_close(loaded(**image).logits, want, rtol=1e-5, atol=1e-5)
        assert (want - model(input_ids=image["input_ids"].clamp(max=VOCAB - 2)).logits).abs().max() > 1e-2  # it saw pixels


def test_megatron_checkpoint_written_back(tmp_path, capsys):
    """A Megatron-LM checkpoint (tp 2, pp 2) of the language model goes back as well: hf -> megatron -> VL bit-exact."""
    multimodal_model("qwen3_vl").save_pretrained(tmp_path / "vl")
    convert(str(tmp_path / "vl"), "hf", str(tmp_path / "megatron"), "megatron", Options(tp=2, pp=2))
    code, _, err = run_cli(capsys, "--input", tmp_path / "megatron", "--input-format", "megatron", "--output",
                           tmp_path / "back", "--output-format", "hf", "--vision-from", tmp_path / "vl")
    assert code == 0, err
    assert_same_tensors(tensors(tmp_path / "back"), tensors(tmp_path / "vl"))


def test_published_experts_layout_is_kept(tmp_path):
    """Published Qwen3-VL-MoE stores stacked experts [E, in, out] (transformers' whole model transposes them on load):
    written back so, bit for bit, and transformers reads the result as the original."""
    model = multimodal_model("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "vl")
    published = {name: t.transpose(1, 2).contiguous() if ".experts." in name else t
                 for name, t in load_file(tmp_path / "vl" / SINGLE).items()}
    save_file(published, tmp_path / "vl" / SINGLE, metadata={"format": "pt"})
    convert(str(tmp_path / "vl"), "hf", str(tmp_path / "native"), "native")
    convert(str(tmp_path / "native"), "native", str(tmp_path / "back"), "hf", Options(vision_from=str(tmp_path / "vl")))
    assert_same_tensors(tensors(tmp_path / "back"), published)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "back", attn_implementation="eager")
    x = torch.randint(0, VOCAB - 2, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("published", [GEMMA3_4B, LLAVA_15, QWEN2_VL_7B, QWEN3_VL_30B, GLM41V_9B],
                         ids=["gemma3-4b", "llava-1.5", "qwen2-vl-7b", "qwen3-vl-30b-a3b", "glm-4.1v-9b"])
def test_published_config_written_back_reads_the_same(published):
    """A published wrapper's config.json with its language model's config written over it (nested, or flat as
    Qwen2-VL's) reads as the same model, by us and by transformers 5.24, its other keys kept."""
    cfg = model_config_from_hf(published)
    written = wrap_config(published, export_hf_config(cfg, "bfloat16", published, text_config(published)["model_type"]))
    full = transformers.AutoConfig.for_model(**copy.deepcopy(written))
    filled = {**getattr(full, "text_config", full).to_dict(), "tie_word_embeddings": full.tie_word_embeddings}
    assert model_config_from_hf(written) == cfg == model_config_from_hf(filled)
    text = text_config(published)
    assert written["model_type"] == published["model_type"] and "vision_config" in written
    assert all(written[k] == v for k, v in published.items() if k not in text and k != "text_config")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A LLaVA checkpoint, its language model as ours (native), as a text checkpoint, and a LLaVA whose language
    model is narrower."""
    root = tmp_path_factory.mktemp("llava")
    multimodal_model("llava").save_pretrained(root / "vl")
    multimodal_model("llava", intermediate_size=48).save_pretrained(root / "narrow")
    convert(str(root / "vl"), "hf", str(root / "native"), "native")
    convert(str(root / "native"), "native", str(root / "text"), "hf")
    return root


def test_written_in_the_checkpoints_dtype(llava, tmp_path):
    """Our fp32 weights go into a bf16 checkpoint as bf16 (the dtype it stores its language model in), unless --dtype
    says otherwise: here the same bytes as transformers' own cast."""
    multimodal_model("llava").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    convert(str(llava / "native"), "native", str(tmp_path / "back"), "hf", Options(vision_from=str(tmp_path / "bf16")))
    assert_same_tensors(tensors(tmp_path / "back"), tensors(tmp_path / "bf16"))


@pytest.mark.parametrize("argv, named", [
    (["--output-family", "llava"], "add --vision-from"),
    (["--vision-from", "{text}"], "is a llama checkpoint, not a multimodal one"),
    (["--vision-from", "{vl}", "--output-family", "gemma3"], "--output-family gemma3 differs from"),
    (["--vision-from", "{vl}", "--output-family", "llama"], "--output-family llama differs from"),
    (["--vision-from", "{narrow}"], "ffn_hidden_size 64 (theirs 48)"),
    (["--vision-from", "{vl}", "--output-format", "native"], "use --output-format hf"),
], ids=["wrapper-without-vision", "text-checkpoint", "other-wrapper", "text-family", "narrower", "native-output"])
def test_vision_from_refusals(llava, argv, named, tmp_path, capsys):
    argv = [a.format(**{k: llava / k for k in ("vl", "text", "narrow")}) for a in argv]
    output_format = [] if "--output-format" in argv else ["--output-format", "hf"]
    code, _, err = run_cli(capsys, "--input", llava / "native", "--input-format", "native", "--output", tmp_path / "out",
                           *output_format, *argv)
    assert code == 2 and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "out").exists()
    assert json.loads((llava / "vl" / "config.json").read_text())["model_type"] == "llava"  # untouched
