"""Packed rows attend within their own samples without a dense mask: the path chosen per machine,
the CPU path (per-sample SDPA) and the dense fallback give the losses and gradients of padded
batches."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F

from medmvl_cli.constants import IGNORE_INDEX
from medmvl_cli.data.collator import LVLMCollator
from medmvl_cli.model import packed_attention
from medmvl_cli.model.packed_attention import PACKED_SDPA, choose_packed_attention, register, segment_bounds

LENGTHS = (9, 14, 5)


def load_llm(preset: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from medmvl_cli.model.presets.models import llm_preset_dir

    return AutoModelForCausalLM.from_pretrained(llm_preset_dir(preset), attn_implementation=attn).eval()


def samples():
    torch.manual_seed(0)
    feats = []
    for n in LENGTHS:
        ids = torch.randint(10, 3000, (n,))
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        feats.append({"input_ids": ids, "labels": labels, "pixel_values": None, "volumes": None})
    return feats


def loss_and_grad(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), model.get_input_embeddings().weight.grad.clone()


def record_sdpa_calls(monkeypatch) -> list:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((query.shape[-2], attn_mask is not None))
        return real(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_packed_sdpa_splits_rows_per_sample_with_the_losses_and_gradients_of_padding(preset, monkeypatch):
    model = load_llm(preset)
    feats = samples()
    loss_padded, grad_padded = loss_and_grad(model, LVLMCollator(0)(feats))
    model.config._attn_implementation = register()
    calls = record_sdpa_calls(monkeypatch)
    loss_packed, grad_packed = loss_and_grad(model, LVLMCollator(0, packing=True)(feats))
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5)
    assert torch.allclose(grad_padded, grad_packed, atol=1e-5)
    layers = model.config.num_hidden_layers
    # One SDPA call per sample and layer, each on that sample alone, no mask built.
    assert calls == [(n, False) for _ in range(layers) for n in LENGTHS]


def test_packed_sdpa_finds_samples_from_position_ids_alone_and_leaves_padded_batches_to_sdpa(monkeypatch):
    model = load_llm("tiny-qwen2")
    feats = samples()
    padded = LVLMCollator(0)(feats)
    packed = {k: v for k, v in LVLMCollator(0, packing=True)(feats).items()
              if k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        reference = model(**padded, use_cache=False).loss
        model.config._attn_implementation = register()
        calls = record_sdpa_calls(monkeypatch)
        assert torch.allclose(model(**packed, use_cache=False).loss, reference, atol=1e-5)
        assert [n for n, _ in calls[: len(LENGTHS)]] == list(LENGTHS)
        calls.clear()
        assert torch.allclose(model(**padded, use_cache=False).loss, reference, atol=1e-6)
        assert calls and all(n == max(LENGTHS) and masked for n, masked in calls)  # padded: the usual masked SDPA


def test_dense_fallback_keeps_the_losses_of_padding_and_is_logged_once(caplog):
    model = load_llm("tiny-qwen2", attn="eager")
    feats = samples()
    with torch.no_grad():
        padded = model(**LVLMCollator(0)(feats), use_cache=False).loss
        packed = model(**LVLMCollator(0, packing=True)(feats), use_cache=False).loss
    assert torch.allclose(padded, packed, atol=1e-5)

    class Holder:  # the two attributes use_packed_attention reads
        llm, config = model, type("C", (), {"text_config": model.config})

    packed_attention._dense_logged = False
    with caplog.at_level(logging.WARNING, logger="medmvl_cli.model.packed_attention"):
        assert packed_attention.use_packed_attention(Holder) == "dense"
        assert packed_attention.use_packed_attention(Holder) == "dense"
    assert sum("dense block-diagonal mask" in r.getMessage() for r in caplog.records) == 1
    assert model.config._attn_implementation == "eager"


def test_the_path_follows_the_machine(monkeypatch):
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_packed_attention(config, cpu, torch.float32) == "packed_sdpa"
    monkeypatch.setattr(packed_attention.importlib.util, "find_spec", lambda name: object())  # flash-attn present
    assert choose_packed_attention(config, cuda, torch.bfloat16) == "flash_attention_2"
    assert choose_packed_attention(config, cuda, torch.float32) == "packed_sdpa"  # flash-attn needs half precision
    monkeypatch.setattr(packed_attention.importlib.util, "find_spec", lambda name: None)
    assert choose_packed_attention(config, cuda, torch.bfloat16) == "packed_sdpa"
    config._attn_implementation = "flash_attention_2"
    assert choose_packed_attention(config, cuda, torch.bfloat16) == "flash_attention_2"
    config._attn_implementation = "eager"
    assert choose_packed_attention(config, cpu, torch.float32) == "dense"
    sliding = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          use_sliding_window=True, sliding_window=16, max_window_layers=0)
    sliding._attn_implementation = "sdpa"
    assert choose_packed_attention(sliding, cpu, torch.float32) == "dense"


def test_segment_bounds():
    assert segment_bounds(torch.tensor([0, 3, 7], dtype=torch.int32), None, 7) == [0, 3, 7]
    assert segment_bounds(None, torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), 7) == [0, 3, 7]
    assert segment_bounds(None, torch.tensor([[0, 1, 2, 3]]), 4) is None  # one sample: plain causal
    assert segment_bounds(None, torch.tensor([[5, 6, 7]]), 3) is None  # a continuation, not a packed row



def test_the_packed_path_is_not_saved_with_the_config():
    model = load_llm("tiny-qwen2")
    model.config._attn_implementation = register()
    assert model.config._attn_implementation == PACKED_SDPA
    assert PACKED_SDPA not in model.config.to_json_string()  # checkpoints load with the recipe's attention


def test_the_sample_boundaries_are_read_to_the_host_once_per_forward(monkeypatch):
    # Every layer gets the same cu_seq_lens tensor; on a GPU each read would be a host sync.
    reads, original = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    cu_seq_lens = torch.tensor([0, 3, 7])
    for _ in range(4):  # four layers
        assert segment_bounds(cu_seq_lens, None, 7) == [0, 3, 7]
    assert len(reads) == 1
    assert segment_bounds(torch.tensor([0, 5, 7]), None, 7) == [0, 5, 7] and len(reads) == 2  # the next batch
