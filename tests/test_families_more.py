"""Decoder-only families read through a menu option of their own (checkpoint/families/ctrl.py): a tiny random
transformers model each, with its norms and biases drawn away from their constant inits, checked as
tests/test_families.py checks the others (logits and loss, hf -> native -> hf, Megatron)."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import perturb_norms_and_biases
from megatron_llm.checkpoint.hf import model_config_from_hf
from megatron_llm.errors import UsageError
from megatron_llm.model.transformer import sinusoid_table
from test_families import (SEQ, VOCAB, assert_hf_native_hf_round_trip, assert_logits_and_loss_match,
                           assert_megatron_round_trip_or_refusal)

# CTRL in its own key names; n_positions above SEQ, so positions past the first rows are read
CTRL = dict(vocab_size=VOCAB, n_embd=64, dff=96, n_layer=2, n_head=4, n_positions=2 * SEQ)
FAMILIES_TESTED = {"ctrl"}  # tests/test_family_coverage.py gathers these


@pytest.fixture(scope="module")
def ctrl_dir(tmp_path_factory):
    config = transformers.AutoConfig.for_model("ctrl", **CTRL)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.CTRLLMHeadModel(config).eval()
    perturb_norms_and_biases(model, 0.5)  # the head's bias too
    path = tmp_path_factory.mktemp("ctrl")
    model.save_pretrained(path)
    return path, model


def test_ctrl_logits_and_loss_match_transformers(ctrl_dir):
    assert_logits_and_loss_match(*ctrl_dir)


def test_ctrl_hf_native_hf_round_trip(ctrl_dir, tmp_path):
    assert_hf_native_hf_round_trip(*ctrl_dir, tmp_path, "ctrl")


def test_ctrl_megatron_refuses_by_name(ctrl_dir, tmp_path):
    assert_megatron_round_trip_or_refusal(ctrl_dir[0], tmp_path, "cannot express model")


def test_ctrl_positions_are_its_table_to_the_bit(ctrl_dir):
    """vaswani_blocked is transformers' CTRL table exactly, and differs from the interleaved one it reorders."""
    want = ctrl_dir[1].transformer.pos_encoding
    assert torch.equal(sinusoid_table(2 * SEQ, 64, "vaswani_blocked"), want)
    assert (sinusoid_table(2 * SEQ, 64, "vaswani") - want).abs().max() > 0.5


def test_ctrl_block_norm_epsilon_other_than_its_own_is_refused():
    config = transformers.AutoConfig.for_model("ctrl", **CTRL, layer_norm_epsilon=1e-5).to_dict()
    with pytest.raises(UsageError, match=r"layer_norm_epsilon=1e-05 is not supported: CTRL's blocks normalise at 1e-06"):
        model_config_from_hf(config)
