"""`MedmvlProcessor`: saved and read back unchanged, its one call equal to the training data path
computed independently, and model folders from before `processor_config.json` still loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medmvl_cli.config.loader import load_recipe
from medmvl_cli.data.annotations import read_records
from medmvl_cli.data.dataset import DatasetSource, LVLMDataset
from medmvl_cli.data.encoding import encode_records
from medmvl_cli.data.image_io import read_image
from medmvl_cli.data.processor import MedmvlProcessor
from medmvl_cli.data.volume_transforms import load_volume
from medmvl_cli.errors import ModelError
from medmvl_cli.inference.load import build, load
from medmvl_cli.model.builder import save_model

RECIPE = """
model:
  llm: {preset: tiny-qwen2, max_length: 256, template: qwen2}
  image:
    encoder: {type: clip, preset: tiny}
    connector: {type: mlp}
    window: [-160, 240]
  image3d:
    encoder: {type: vit3d, preset: tiny}
    connector: {type: spatial_pooling, pool: 2}
    volume: {size: [8, 32, 32], crop_foreground: false, augment: {flip_prob: 0.5}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medmvl_cli.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, kind="both", n=4, seed=3, volume_size=(8, 32, 32), questions="easy")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    (root / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(root / "recipe.yaml", stage="finetune")
    torch.manual_seed(0)
    model, processor = build(recipe, dtype="float32")
    return recipe, model.eval(), processor


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory) -> Path:
    _, model, processor = built
    return save_model(model, tmp_path_factory.mktemp("run") / "model", processor)


def test_round_trip_keeps_every_setting(built, saved):
    _, model, processor = built
    assert json.loads((saved / "processor_config.json").read_text()) == processor.to_dict()
    again = MedmvlProcessor.from_pretrained(saved)
    assert again.to_dict() == processor.to_dict()
    assert again.tokens == {"<image>": model.num_tokens("image"), "<image3d>": model.num_tokens("image3d")}
    assert again.image_window == (-160.0, 240.0) and again.volume == processor.volume
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    text = "<image>\n<image3d>\nIs it there?"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert again.tokenizer.chat_template == processor.template.jinja(processor.tokenizer)
    config = json.loads((saved / "config.json").read_text())
    assert not {"template", "max_length"} & set(config) and "volume" not in config["image3d"]


def _records(data: Path, name: str):
    records = read_records(str(data / name), require_answer=True)
    return records[:2]


@pytest.mark.parametrize("name, kind", [("train_2d.json", "images"), ("train_3d.json", "volumes")])
def test_the_one_call_gives_the_training_inputs(built, data, name, kind):
    """What the processor's call gives equals what the pieces of the training path give, each
    computed on its own: the template encoding with the model's token counts, the image processor
    on the windowed file, the volume pipeline on the file."""
    _, _, processor = built
    encoded, report = encode_records(_records(data, name), processor.tokenizer, processor.template, processor.tokens,
                                     processor.max_length)
    assert report.kept == 2
    dataset = LVLMDataset.from_sources([DatasetSource(str(data / name))], processor, train=False)
    for index, enc in enumerate(encoded):
        record = enc.record
        files = [data / p for p in getattr(record, kind)]
        inputs = processor(record.messages(), **{kind: files})
        assert inputs["input_ids"][0].tolist() == enc.input_ids
        assert inputs["labels"][0].tolist() == enc.labels
        assert inputs["attention_mask"].all()
        if kind == "images":
            pictures = [read_image(f, window=(-160.0, 240.0)) for f in files]
            expected = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
            assert torch.equal(inputs["pixel_values"], expected) and "volumes" not in inputs
        else:
            expected = torch.stack([load_volume(f, processor.volume) for f in files])
            assert torch.equal(inputs["volumes"], expected) and "pixel_values" not in inputs
        item = dataset[index]
        assert torch.equal(item["input_ids"], inputs["input_ids"][0]) and torch.equal(item["labels"], inputs["labels"][0])
        media = item["pixel_values"] if kind == "images" else item["volumes"]
        assert torch.equal(media, expected)


def test_training_items_are_augmented_and_prompts_left_padded(built, data):
    _, _, processor = built
    volume = data / read_records(str(data / "train_3d.json"), require_answer=True)[0].volumes[0]
    torch.manual_seed(0)
    flips = [processor.volumes([volume], train=True) for _ in range(8)]
    plain = processor.volumes([volume])
    assert any(not torch.equal(f, plain) for f in flips)  # flip_prob 0.5 on three axes
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "user", "content": "<image>\nWhat is shown in this picture, in a few words?"}]
    batch = processor([short, long])
    assert "labels" not in batch
    mask = batch["attention_mask"]
    assert mask[0, -1] == 1 and mask[0, 0] == 0 and mask[1].all()  # left-padded: prompts end together
    assert batch["input_ids"][0, mask[0].bool()].tolist() == processor(short)["input_ids"][0].tolist()


def _old_style(folder: Path, processor: MedmvlProcessor) -> None:
    """What a model folder saved before processor_config.json held: the data side in config.json."""
    settings = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(template=settings["template"], max_length=settings["max_length"])
    config["image"]["window"] = settings["image_window"]
    config["image3d"]["volume"] = settings["volume"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_a_model_folder_saved_before_the_processor_loads(built, saved, tmp_path, data):
    _, model, processor = built
    old = Path(shutil.copytree(saved, tmp_path / "old" / "model"))
    _old_style(old, processor)
    loaded, again = load(old.parent, dtype="float32", device=None)
    assert again.to_dict() == processor.to_dict()
    assert not hasattr(loaded.config, "template") and "volume" not in loaded.config.image3d
    messages = [{"role": "user", "content": "<image3d>\nWhich side?"}]
    volume = data / read_records(str(data / "train_3d.json"), require_answer=True)[0].volumes[0]
    inputs = again(messages, volumes=[volume])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_a_config_json_written_by_the_previous_version_loads(tmp_path):
    """The config.json main wrote before this change (fixture), beside the same weights."""
    fixture = Path(__file__).parents[1] / "fixtures" / "saved_before_processor"
    recipe = load_recipe(fixture / "recipe.yaml", stage="finetune")
    torch.manual_seed(0)
    model, processor = build(recipe, dtype="float32")
    folder = save_model(model.eval(), tmp_path / "run" / "model", processor)
    (folder / "processor_config.json").unlink()
    shutil.copy(fixture / "config.json", folder / "config.json")
    loaded, again = load(folder.parent, dtype="float32", device=None)
    assert again.to_dict() == processor.to_dict()
    ids = torch.tensor([[model.config.image_token_id] * model.num_tokens("image") + [5, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits)


def test_a_processor_that_does_not_fit_the_model_is_refused(saved, tmp_path):
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["tokens"]["<image>"] += 1
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelError, match="expands placeholders"):
        load(folder, device=None)


def test_the_python_api_answers(saved, data):
    """The docs/model.md example: load, the processor's call, generate, decode."""
    import medmvl_cli

    model, processor = medmvl_cli.load(saved.parent, device=None)
    image = data / read_records(str(data / "train_2d.json"), require_answer=True)[0].images[0]
    inputs = processor([{"role": "user", "content": "<image>\nWhere is the spot?"}], images=[image])
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=processor.pad_token_id, eos_token_id=processor.stop_token_ids)
    assert output.shape == (1, 4)  # the new tokens only (min_new_tokens below keeps all four)
    assert processor.decode(output[0]) == processor.tokenizer.decode(output[0], skip_special_tokens=True).strip()


def test_validate_counts_tokens_without_reading_weights(built, monkeypatch):
    """`data validate --recipe` builds the encoders and connectors on the meta device: no weights read."""
    from transformers import PreTrainedModel

    from medmvl_cli.model import token_counts

    recipe, model, _ = built

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    assert token_counts.placeholder_lengths_for_recipe(recipe) == token_counts.placeholder_lengths(model)


def test_the_builder_functions_the_docs_name_import_from_the_model_package():
    import medmvl_cli.model as model_package
    from medmvl_cli.model import build_model, builder, load_model, save_model

    assert (build_model, load_model, save_model) == (builder.build_model, builder.load_model, builder.save_model)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        model_package.nothing_here  # noqa: B018
