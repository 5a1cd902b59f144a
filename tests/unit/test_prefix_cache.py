"""Prefix reuse (inference/prefix_cache.py): the plan, and greedy answers and logits equal to the
plain left-padded batch on random tiny models (2D and 3D, several seeds, prompts of different
lengths around the shared media)."""

from __future__ import annotations

import pytest
import torch

from medmvl_cli.inference.prefix_cache import PrefixStore, generate_with_plan, plan_shared_prefixes, reuse_pays
from tests.unit.test_lvlm import BOTH, ids_for, left_pad, make


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return make(tmp_path_factory.mktemp("both"), BOTH.format(llm="tiny-qwen2", attn="sdpa"))


def test_the_plan_groups_rows_by_media_and_keeps_a_suffix_for_each():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4]]
    plan = plan_shared_prefixes(prompts, [("a",), ("a",), ("b",), ("a",), ()])
    assert plan.group_of_row == [0, 0, 1, 0, 2]
    # group a shares [1, 2, 3]; b and the media-less row keep their last token as the suffix
    assert plan.prefix_lengths == [3, 1, 3] and plan.first_row == [0, 2, 4]
    assert plan.tokens_saved() == 3 * 2
    # the same prompt twice: everything but its last token is shared
    assert plan_shared_prefixes([[1, 2, 3], [1, 2, 3]], [("a",), ("a",)]).prefix_lengths == [2]
    # nothing shared: no plan (the plain batch is as fast)
    assert plan_shared_prefixes([[1, 2], [1, 2]], [("a",), ("b",)]) is None
    assert plan_shared_prefixes([[1, 2], [1, 2]], [(), ()]) is None
    assert plan_shared_prefixes([[1, 2], [1, 3], [5]], [("a",), ("a",), ("b",)]) is None  # a one-token prompt


def test_a_store_serves_the_run_a_later_prompt_shares():
    store = PrefixStore(size=1)
    layer = (torch.arange(5.0).view(1, 1, 5, 1), -torch.arange(5.0).view(1, 1, 5, 1))
    store.put(("a",), [1, 2, 3, 4, 5], [layer])
    assert store.lookup(("b",), [[1, 2, 3]]) is None
    shared, layers = store.lookup(("a",), [[1, 2, 3, 9, 9], [1, 2, 3, 4]])
    assert shared == 3 and layers[0][0].flatten().tolist() == [0, 1, 2]
    plan = plan_shared_prefixes([[1, 2, 7]], [("a",)], store)  # one question: its prefix comes from the store
    assert plan.prefix_lengths == [2] and plan.stored[0] is not None and plan.tokens_saved() == 2
    fresh = plan_shared_prefixes([[8, 9, 7]], [("c",)], store)  # nothing stored: prefilled, to be kept
    assert fresh.prefix_lengths == [2] and fresh.stored == [None] and fresh.tokens_saved() == 0
    store.put(("c",), [8, 9], [layer])
    assert store.lookup(("a",), [[1, 2, 3]]) is None  # size 1: the older media was dropped


def _generate(model, tokenizer, rows, media: dict, plan=None, store=None):
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None, min_new_tokens=8,
                  return_dict_in_generate=True, output_logits=True)
    if plan is None:
        return model.generate(input_ids=ids, attention_mask=mask, **media, **kwargs)
    return generate_with_plan(model, plan, model.embed_inputs(ids, **media), mask, store, rows, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_reuse_gives_the_plain_batch_answers_and_logits(both, seed):
    model, tokenizer, _ = both
    gen = torch.Generator().manual_seed(seed)
    head = ids_for(model, [3], seed)
    # Two volumes asked 3 and 2 questions of different lengths, an image asked twice, a volume once.
    volume_rows = [head + ids_for(model, ["V", n], seed + n) for n in (4, 9, 6)]
    volume_rows += [head + ids_for(model, [2, "V", n], seed + 10 + n) for n in (5, 1)]
    volume_rows.append(head + ids_for(model, ["V", 7], seed + 20))
    image_rows = [head + ids_for(model, ["I", n], seed + 30 + n) for n in (2, 8)]
    volumes = torch.rand((3, 1, 8, 32, 32), generator=gen)
    pixels = torch.rand((1, 3, 32, 32), generator=gen)
    with torch.no_grad():
        volume_embeds = model.encode_volumes(volumes)
        image_embeds = model.encode_images(pixels).expand(2, -1, -1)
    cases = [
        (volume_rows, {"volume_embeds": volume_embeds[[0, 0, 0, 1, 1, 2]]}, ["a", "a", "a", "b", "b", "c"]),
        (image_rows, {"image_embeds": image_embeds}, ["x", "x"]),
    ]
    for rows, media, keys in cases:
        plan = plan_shared_prefixes(rows, [(k,) for k in keys])
        assert plan is not None and plan.tokens_saved() >= model.num_tokens("image")
        plain, reused = _generate(model, tokenizer, rows, media), _generate(model, tokenizer, rows, media, plan)
        assert torch.equal(plain.sequences, reused.sequences)
        for a, b in zip(plain.logits, reused.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert (plain.logits[0][0] - plain.logits[0][1]).abs().max() > 1e-3  # the rows do differ

    # One question at a time, the prefix kept from one call to the next (batch size 1).
    store = PrefixStore()
    rows, media = volume_rows[:3], volume_embeds[:1]
    for i, row in enumerate(rows):
        plan = plan_shared_prefixes([row], [("a",)], store)
        assert (plan.stored[0] is None) == (i == 0)
        plain = _generate(model, tokenizer, [row], {"volume_embeds": media})
        reused = _generate(model, tokenizer, [row], {"volume_embeds": media}, plan, store)
        assert torch.equal(plain.sequences, reused.sequences)
        for a, b in zip(plain.logits, reused.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_reuse_runs_only_where_it_spares_a_good_share_of_the_prefill():
    head = list(range(100, 140))  # template head + image tokens: 40 ids
    store = PrefixStore()
    store.put(("a",), head + [1], [(torch.zeros(1, 1, 41, 1), torch.zeros(1, 1, 41, 1))])
    one = [head + [1, 2, 3]]
    plan = plan_shared_prefixes(one, [("a",)], store)
    assert plan is not None and plan.tokens_saved() == 41
    assert not reuse_pays(plan, one)  # one row: decoding dominates, the plain path runs
    shared = [head + [1, 2, 3], head + [4, 5], head + [6]]
    assert reuse_pays(plan_shared_prefixes(shared, [("b",)] * 3), shared)
    long_tails = [[7, 8] + list(range(200, 240)), [7, 8] + list(range(300, 340))]  # 1 shared id vs 40-id tails
    assert not reuse_pays(plan_shared_prefixes(long_tails, [("c",)] * 2), long_tails)
    assert not reuse_pays(None, shared)
