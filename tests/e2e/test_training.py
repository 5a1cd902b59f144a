"""Training stages end to end on tiny presets: run folder, resume, faults, LoRA, chains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.config.loader import load_recipe
from medmvl_cli.engine.stages import train_stage
from medmvl_cli.errors import DataError, RunError
from tests.e2e.conftest import read_metrics

runner = CliRunner()


def test_finetune_writes_a_complete_run_folder(recipe_2d, synth_data):
    result = runner.invoke(app, ["finetune", str(recipe_2d), "--quiet"])
    assert result.exit_code == 0, result.output
    run = recipe_2d.parent / "runs" / "tiny-2d"
    assert (run / "FINISHED").is_file()
    header = (run / "recipe.yaml").read_text().splitlines()[0]
    assert header.startswith("# medmvl ") and "git " in header
    assert load_recipe(run / "recipe.yaml").train.lr == 1e-3  # the saved recipe runs again as it is
    model = run / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (model / name).is_file(), name
    steps = -(-len(json.loads((synth_data / "train_2d.json").read_text())) // 4)  # batch 4, one epoch
    saved = [f"step-{s}" for s in range(2, steps + 1, 2)][-2:]  # every 2 steps, the limit keeps 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert all(key in r for r in rows), key
    assert all(r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_a_non_empty_output_dir_is_refused_without_overwrite_or_resume(recipe_2d):
    assert runner.invoke(app, ["finetune", str(recipe_2d), "-q", "train.max_steps=1"]).exit_code == 0
    refused = runner.invoke(app, ["finetune", str(recipe_2d), "-q", "train.max_steps=1"])
    assert refused.exit_code == 1 and "--resume auto" in refused.output and "--overwrite" in refused.output
    again = runner.invoke(app, ["finetune", str(recipe_2d), "-q", "train.max_steps=1", "--overwrite"])
    assert again.exit_code == 0, again.output


def test_overwrite_refuses_a_folder_that_is_not_a_run(recipe_2d, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["finetune", str(recipe_2d), "-q", f"output_dir={precious}", "--overwrite"])
    assert result.exit_code == 1 and (precious / "notes.txt").read_text() == "keep me"


def test_dry_run_prints_recipe_counts_and_launch_command(recipe_2d):
    result = runner.invoke(app, ["lora", str(recipe_2d), "--dry-run", "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    assert "stage: lora" in result.output and "image_connector" in result.output
    assert "torch.distributed.run" in result.output and "--nproc_per_node=2" in result.output
    assert not (recipe_2d.parent / "runs").exists()


def _losses_until(recipe: Path, overrides: list[str], stop_at_step: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "medmvl_cli", "finetune", str(recipe), "-q", *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_ends_with_the_same_losses(recipe_2d, tmp_path):
    common = ["train.max_steps=8", "train.epochs=10", "train.save_steps=2", "train.save_total_limit=null"]
    straight = subprocess.run([sys.executable, "-m", "medmvl_cli", "finetune", str(recipe_2d), "-q",
                               "output_dir=runs/straight", *common], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    reference = read_metrics(tmp_path / "runs" / "straight")

    run = tmp_path / "runs" / "killed"
    proc = _losses_until(recipe_2d, [f"output_dir={run}", *common])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "FINISHED").exists()
    resumed = subprocess.run([sys.executable, "-m", "medmvl_cli", "finetune", str(recipe_2d), "-q",
                              f"output_dir={run}", *common, "--resume", "auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    losses = read_metrics(run)
    assert sorted(losses) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert abs(losses[step] - reference[step]) < 1e-5, (step, losses[step], reference[step])


def test_a_nan_loss_stops_the_run_naming_the_step(recipe_2d, monkeypatch):
    from medmvl_cli.engine import trainer as trainer_module

    original = trainer_module.LVLMTrainer.compute_loss

    def poisoned(self, model, inputs, **kwargs):
        loss = original(self, model, inputs, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(trainer_module.LVLMTrainer, "compute_loss", poisoned)
    recipe = load_recipe(recipe_2d, ["train.save_steps=2", "train.max_steps=3"])
    with pytest.raises(RunError, match="at step 3"):
        train_stage(recipe, quiet=True)
    run = Path(recipe.output_dir)
    assert (run / "checkpoints" / "step-2").is_dir() and not (run / "FINISHED").exists()


def test_a_record_whose_file_fails_stops_the_run_or_is_skipped(recipe_2d, synth_data, tmp_path):
    records = json.loads((synth_data / "train_2d.json").read_text())
    records[1]["image"] = ["images/missing.png"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    overrides = [f"data.train.0.annotations={broken}", f"data.train.0.image_root={synth_data}", "train.max_steps=3"]
    with pytest.raises(DataError, match=records[1]["id"]):
        train_stage(load_recipe(recipe_2d, overrides), quiet=True)
    run = train_stage(load_recipe(recipe_2d, overrides + ["data.skip_bad_records=true"]), overwrite=True, quiet=True)
    assert (run / "FINISHED").is_file()


def test_lora_run_saves_an_adapter_and_answers(recipe_2d, synth_data):
    result = runner.invoke(app, ["lora", str(recipe_2d), "-q", "lora.r=4", "lora.alpha=8"])
    assert result.exit_code == 0, result.output
    model = recipe_2d.parent / "runs" / "tiny-2d" / "model"
    adapter = json.loads(next(model.rglob("adapter_config.json")).read_text())
    assert adapter["r"] == 4
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets  # every linear
    assert "lm_head" not in targets
    out = runner.invoke(app, ["infer", "--model", str(model.parent), "--image",
                              str(synth_data / "images" / "test-00000.png"), "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output


def test_pretrain_then_finetune_chain(recipe_3d):
    pre = runner.invoke(app, ["pretrain", str(recipe_3d), "-q", "output_dir=runs/pre", "train.max_steps=2"])
    assert pre.exit_code == 0, pre.output
    pre_run = recipe_3d.parent / "runs" / "pre"
    assert load_recipe(pre_run / "recipe.yaml").trainable.llm == "frozen"
    fine = runner.invoke(app, ["finetune", str(recipe_3d), "-q", "output_dir=runs/fine", "train.max_steps=2",
                               f"init_from={pre_run}"])
    assert fine.exit_code == 0, fine.output
    from safetensors.torch import load_file

    pre_w = load_file(pre_run / "model" / "model.safetensors")
    fine_w = load_file(recipe_3d.parent / "runs" / "fine" / "model" / "model.safetensors")
    connector = [k for k in pre_w if "image3d_connector" in k][0]
    assert not torch.equal(pre_w[connector], fine_w[connector])  # finetune started from and moved on
    frozen_llm = [k for k in pre_w if k.startswith("llm.") and "embed" not in k][0]
    assert frozen_llm in fine_w


def test_component_learning_rates_and_no_decay_on_norms_and_biases(recipe_2d, tmp_path):
    from medmvl_cli.engine.stages import build_training_model, component_learning_rates, training_arguments
    from medmvl_cli.engine.trainer import LVLMTrainer
    from medmvl_cli.runs.folder import RunFolder

    recipe = load_recipe(recipe_2d, ["train.lr_connector=5e-3", "train.lr_encoder=1e-5", "train.weight_decay=0.1"])
    model, _ = build_training_model(recipe)
    trainer = LVLMTrainer(model=model, args=training_arguments(recipe, RunFolder(tmp_path / "run"), quiet=True),
                          param_lrs=component_learning_rates(model, recipe))
    optimizer = trainer.create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    components = model.components()
    for name, lr in (("image_connector", 5e-3), ("image_encoder", 1e-5), ("llm", 1e-3)):
        params = [p for p in components[name].parameters() if p.requires_grad]
        assert params and all(group_of[id(p)]["lr"] == lr for p in params), name
    for name, param in model.named_parameters():
        if param.requires_grad and (name.endswith("bias") or "norm" in name):
            assert group_of[id(param)]["weight_decay"] == 0.0, name
    assert any(g["weight_decay"] == 0.1 for g in optimizer.param_groups)


@pytest.mark.parametrize("extra", [[], ["trainable.llm=lora", "train.gradient_checkpointing=true"]], ids=["full", "lora-ckpt"])
def test_packed_training_runs_the_packed_path_with_the_losses_of_padded_training(recipe_2d, caplog, extra):
    import logging

    overrides = ["train.max_steps=2", "trainable.image_encoder=frozen"] + extra
    padded = train_stage(load_recipe(recipe_2d, overrides + ["output_dir=runs/padded"]), quiet=True)
    with caplog.at_level(logging.INFO, logger="medmvl_cli.model.packed_attention"):
        packed = train_stage(load_recipe(recipe_2d, overrides + ["output_dir=runs/packed", "data.packing=true"]),
                             quiet=True)
    assert "packed attention path: packed_sdpa" in caplog.text
    losses_padded, losses_packed = read_metrics(Path(padded)), read_metrics(Path(packed))
    assert losses_padded.keys() == losses_packed.keys() == {1, 2}
    for step in (1, 2):  # the same batches, so the same losses, step 2 after an update
        assert losses_packed[step] == pytest.approx(losses_padded[step], rel=1e-4)
    assert "medmvl_packed_sdpa" not in (Path(packed) / "model" / "config.json").read_text()
