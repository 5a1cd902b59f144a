"""Placeholder expansion, the one truncation point, padded and packed batches, the sampler."""

from __future__ import annotations

import pytest
import torch

from medmvl_cli.constants import IGNORE_INDEX
from medmvl_cli.data.annotations import Record, Source, Turn
from medmvl_cli.data.collator import LVLMCollator
from medmvl_cli.data.dataset import SKIPPED
from medmvl_cli.data.encoding import encode_records, fit_to_length
from medmvl_cli.data.sampler import WeightedLengthGroupedSampler
from medmvl_cli.data.templates import Encoded, get_template
from medmvl_cli.model.presets.tokenizer_files import load_preset_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_preset_tokenizer("qwen2")


def record(rid: str, question: str, answer: str, images=(), volumes=()) -> Record:
    return Record(id=rid, conversations=(Turn("human", question), Turn("gpt", answer)),
                  images=tuple(images), volumes=tuple(volumes), source=Source("mem.json", 0))


def test_placeholders_expand_to_the_model_token_count(tokenizer):
    recs = [record("a", "<image>\n<image3d>\nAny nodule?", "No.", images=["x.png"], volumes=["ct.nii.gz"])]
    encoded, report = encode_records(recs, tokenizer, get_template("qwen2"), {"<image>": 7, "<image3d>": 11}, 512)
    ids = encoded[0].input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 7
    assert ids.count(tokenizer.convert_tokens_to_ids("<image3d>")) == 11
    assert report.kept == 1 and not report.dropped
    trained = [t for t, label in zip(ids, encoded[0].labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "No.<|im_end|>"


def test_over_long_samples_are_dropped_and_counted_by_id(tokenizer):
    recs = [record("short", "<image>\nQ?", "Yes.", images=["a.png"]),
            record("long", "<image>\n" + "word " * 200, "Yes.", images=["b.png"])]
    encoded, report = encode_records(recs, tokenizer, get_template("qwen2"), {"<image>": 16}, 64)
    assert [e.record.id for e in encoded] == ["short"]
    assert sum(len(v) for v in report.dropped.values()) == 1
    assert any("long" in ids for ids in report.dropped.values())
    assert all(len(e) <= 64 for e in encoded)


def test_truncate_answers_cuts_only_the_answer_tail(tokenizer):
    recs = [record("r", "<image>\nDescribe.", "finding " * 80, images=["a.png"])]
    template = get_template("qwen2")
    encoded, report = encode_records(recs, tokenizer, template, {"<image>": 16}, 64, truncate_answers=True)
    assert len(encoded[0]) == 64 and report.truncated == ["r"]
    assert encoded[0].input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 16
    assert any(label != IGNORE_INDEX for label in encoded[0].labels)


def test_image_tokens_and_vanished_answers_are_never_cut():
    image = 99
    over_image = Encoded(input_ids=[1, 2] + [image] * 5 + [3], labels=[-100] * 7 + [3])
    assert fit_to_length(over_image, 4, [image], True) == (None, "image tokens beyond model.llm.max_length (image tokens are never cut)")
    late_answer = Encoded(input_ids=[1, 2, 3, 4, 5, 6], labels=[-100, -100, -100, -100, 5, 6])
    assert fit_to_length(late_answer, 4, [image], True)[0] is None
    nothing = Encoded(input_ids=[1, 2], labels=[-100, -100])
    assert fit_to_length(nothing, 4, [image], False)[1] == "no answer tokens to train on"


def features(lengths, with_images=()):
    out = []
    for i, n in enumerate(lengths):
        f = {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)}
        f["labels"][0] = IGNORE_INDEX
        f["pixel_values"] = torch.full((1, 3, 4, 4), float(i)) if i in with_images else None
        f["volumes"] = None
        out.append(f)
    return out


def test_padded_batch_with_mixed_modalities():
    batch = LVLMCollator(pad_token_id=0)(features([3, 5, 2], with_images={0, 2}))
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 2.0]  # in batch order
    assert "volumes" not in batch


def test_packed_batch_restarts_positions_and_masks_boundaries():
    batch = LVLMCollator(pad_token_id=0, packing=True)(features([3, 4]))
    assert batch["input_ids"].shape == (1, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"][0, 3].item() == IGNORE_INDEX
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 7]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4


def test_skipped_records_are_reported_not_replaced():
    feats = features([3, 4])
    batch = LVLMCollator(pad_token_id=0)([feats[0], {SKIPPED: "bad-1"}, feats[1]])
    assert batch[SKIPPED] == ["bad-1"] and batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_packing_gives_the_same_loss_as_padding(preset):
    from transformers import AutoModelForCausalLM

    from medmvl_cli.model.presets.models import llm_preset_dir

    model = AutoModelForCausalLM.from_pretrained(llm_preset_dir(preset), attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    feats = []
    for n in (9, 14, 5):
        ids = torch.randint(10, 3000, (n,))
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        feats.append({"input_ids": ids, "labels": labels, "pixel_values": None, "volumes": None})
    padded = LVLMCollator(pad_token_id=0)(feats)
    packed = LVLMCollator(pad_token_id=0, packing=True)(feats)
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5)


def test_sampler_weights_grouping_and_determinism():
    lengths = list(range(1, 41))
    sources = [0] * 30 + [1] * 10
    sampler = WeightedLengthGroupedSampler(lengths, sources, [1.0, 2.0], batch_size=4, group_by_length=False, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 50
    assert sum(1 for i in first if sources[i] == 1) == 20  # weight 2: every record twice
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    half = WeightedLengthGroupedSampler(lengths, sources, [0.5, 1.0], batch_size=4, group_by_length=False, seed=3)
    assert len(list(half)) == 25 and len(set(half)) == 25
    grouped = list(WeightedLengthGroupedSampler(lengths, sources, [1.0, 1.0], batch_size=4, group_by_length=True, seed=3))
    assert sorted(grouped) == list(range(40))
    assert [lengths[i] for i in grouped] == sorted((lengths[i] for i in grouped), reverse=True)
