"""Forward + backward time of medmvl's merge path against a naive per-sample loop.

The naive path is MedM-VL's `prepare_inputs_for_multimodal`: per sample, find the placeholder
positions (`.tolist()`), embed the text pieces, splice the image features in one by one, then
re-pad the batch. medmvl's path embeds the already-expanded ids and writes all features with one
`masked_scatter`. Both run the same encoder call and connector on a batch of 16 (tiny CLIP + tiny
Qwen2 presets by default, CPU) and give the same loss (reported). Two figures: `merge_only`
(text embedding + splicing precomputed features, forward + backward: where the paths differ) and
`full_step` (with the LLM and its loss; with a tiny LLM the merge is a visible share of it).

    python benchmarks/merge_path.py [--batch 16] [--repeats 20] [--llm tiny-qwen2]

Prints one JSON object: median milliseconds per step for each path (runs interleaved) and the
speed-up (naive / ours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RECIPE = """
model:
  llm: {{preset: {llm}, max_length: 4096}}
  image:
    encoder: {{type: clip, preset: tiny}}
    connector: {{type: mlp, depth: 2}}
"""
IGNORE = -100


def make_batch(model, batch: int, seed: int = 0):
    """Records with 1-2 images and 20-120 text tokens: expanded (ours) and unexpanded (naive) ids."""
    gen = torch.Generator().manual_seed(seed)
    image_id, per_image = model.config.image_token_id, model.num_tokens("image")
    expanded, compact, n_images = [], [], 0
    for _ in range(batch):
        images = int(torch.randint(1, 3, (1,), generator=gen))
        pieces = [torch.randint(10, 2000, (int(torch.randint(10, 60, (1,), generator=gen)),), generator=gen).tolist()
                  for _ in range(images + 1)]
        long, short = list(pieces[0]), list(pieces[0])
        for piece in pieces[1:]:
            long += [image_id] * per_image + piece
            short += [image_id] + piece
        expanded.append(long)
        compact.append(short)
        n_images += images
    pixels = torch.randn(n_images, 3, 32, 32, generator=gen)
    return expanded, compact, pixels


def pad(rows, value):
    width = max(map(len, rows))
    out = torch.full((len(rows), width), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return out, mask


def ours_merge(model, ids, mask, labels, features):
    """Expanded ids -> (embeddings, attention mask, labels): one masked_scatter."""
    return model.embed_inputs(ids, image_embeds=features), mask, labels.masked_fill(model.placeholder_mask(ids), IGNORE)


def naive_merge(model, ids, mask, labels, features):
    """Compact ids (one `<image>` per image) -> (embeddings, attention mask, labels), MedM-VL's way:
    a Python loop over samples and over the images of each sample, then re-padding."""
    image_id = model.config.image_token_id
    embed = model.llm.get_input_embeddings()
    rows, new_labels, cursor = [], [], 0
    for cur_ids, cur_mask, cur_labels in zip(ids, mask.bool(), labels):
        cur_ids, cur_labels = cur_ids[cur_mask], cur_labels[cur_mask]
        positions = torch.where(cur_ids == image_id)[0].tolist()
        bounds = [-1] + positions + [cur_ids.shape[0]]
        text = [cur_ids[bounds[i] + 1: bounds[i + 1]] for i in range(len(bounds) - 1)]
        text_labels = [cur_labels[bounds[i] + 1: bounds[i + 1]] for i in range(len(bounds) - 1)]
        text_embeds = torch.split(embed(torch.cat(text)), [t.shape[0] for t in text])
        pieces, piece_labels = [], []
        for i in range(len(text)):
            pieces.append(text_embeds[i])
            piece_labels.append(text_labels[i])
            if i < len(positions):
                pieces.append(features[cursor])
                piece_labels.append(torch.full((features.shape[1],), IGNORE, device=ids.device))
                cursor += 1
        rows.append(torch.cat(pieces))
        new_labels.append(torch.cat(piece_labels))
    width = max(r.shape[0] for r in rows)
    padded = torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], r.shape[1])]) for r in rows])
    attention = torch.zeros(len(rows), width, dtype=torch.long, device=ids.device)
    target = torch.full((len(rows), width), IGNORE, device=ids.device)
    for i, (r, lab) in enumerate(zip(rows, new_labels)):
        attention[i, : r.shape[0]] = 1
        target[i, : r.shape[0]] = lab
    return padded, attention, target


def step(merge, model, batch, pixels, with_llm: bool) -> torch.Tensor:
    """Forward + backward. with_llm: encoder + connector, the merge, the LLM and its loss;
    else the merge alone, on precomputed features (a leaf that takes gradients)."""
    if with_llm:
        features = model.encode_images(pixels)
    else:
        features = pixels
    embeds, attention, labels = merge(model, *batch, features)
    if with_llm:
        loss = model.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
    else:
        loss = (embeds * (attention.unsqueeze(-1) > 0)).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    if features.is_leaf and features.grad is not None:
        features.grad = None
    return loss.detach()


def compare(model, ours_batch, naive_batch, pixels, with_llm: bool, repeats: int) -> dict:
    """Median ms of each path, runs interleaved so that machine noise hits both alike."""
    ours_loss = step(ours_merge, model, ours_batch, pixels, with_llm)  # warm-up
    naive_loss = step(naive_merge, model, naive_batch, pixels, with_llm)
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for _ in range(repeats):
        for name, merge, batch in (("ours", ours_merge, ours_batch), ("naive", naive_merge, naive_batch)):
            start = time.perf_counter()
            step(merge, model, batch, pixels, with_llm)
            if pixels.is_cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000)
    ours_ms, naive_ms = statistics.median(times["ours"]), statistics.median(times["naive"])
    return {
        "ours_ms": round(ours_ms, 2), "naive_loop_ms": round(naive_ms, 2),
        "speedup": round(naive_ms / ours_ms, 2), "loss_difference": float((ours_loss - naive_loss).abs()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--llm", default="tiny-qwen2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (host syncs cost the naive loop more there)")
    args = parser.parse_args()

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.model.builder import build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(RECIPE.format(llm=args.llm))
        torch.manual_seed(0)
        model, tokenizer, _ = build_model(load_recipe(path))
    device = torch.device(args.device)
    model.to(device).train()
    expanded, compact, pixels = make_batch(model, args.batch)
    pad_id = tokenizer.pad_token_id
    ids, mask = pad(expanded, pad_id)
    labels = ids.masked_fill(mask == 0, IGNORE)
    short_ids, short_mask = pad(compact, pad_id)
    short_labels = short_ids.masked_fill(short_mask == 0, IGNORE)

    ids, mask, labels, short_ids, short_mask, short_labels, pixels = (
        t.to(device) for t in (ids, mask, labels, short_ids, short_mask, short_labels, pixels)
    )
    with torch.no_grad():
        features = model.encode_images(pixels)
    features.requires_grad_(True)
    ours_batch = (ids, mask, labels)
    naive_batch = (short_ids, short_mask, short_labels)
    print(json.dumps({
        "batch": args.batch,
        "images": int(pixels.shape[0]),
        "tokens_per_image": model.num_tokens("image"),
        "sequence_length": int(ids.shape[1]),
        "llm": args.llm,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "merge_only": compare(model, ours_batch, naive_batch, features, with_llm=False, repeats=args.repeats),
        "full_step": compare(model, ours_batch, naive_batch, pixels, with_llm=True, repeats=args.repeats),
    }))

if __name__ == "__main__":
    main()
