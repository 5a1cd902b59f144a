"""Data-parallel training on 2 CPU ranks (gloo), DeepSpeed ZeRO-2 and ZeRO-3, launched by medmvl itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import read_metrics

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medmvl(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "medmvl_cli", *args], capture_output=True, text=True,
                            env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


COMMON = ["-q", "train.max_steps=3", "train.save_steps=100", "train.logging_steps=1", "data.group_by_length=false"]


def test_ddp_two_ranks_match_one_rank_with_the_doubled_batch(recipe_2d, tmp_path):
    medmvl("finetune", str(recipe_2d), *COMMON, "output_dir=runs/single", "train.batch_size=4")
    ddp = medmvl("finetune", str(recipe_2d), *COMMON, "output_dir=runs/ddp", "train.batch_size=2",
                 "--nproc-per-node", "2", "--master-port", str(free_port()))
    assert "parameters agree on all 2 ranks" in ddp.stderr
    single, double = read_metrics(tmp_path / "runs" / "single"), read_metrics(tmp_path / "runs" / "ddp")
    assert sorted(single) == sorted(double) == [1, 2, 3]
    for step in single:
        assert abs(single[step] - double[step]) < 1e-4, (step, single[step], double[step])
    a = load_file(tmp_path / "runs" / "single" / "model" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "ddp" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_deepspeed_zero2_on_two_ranks_trains_and_saves_a_model_infer_loads(recipe_2d, synth_data, tmp_path):
    medmvl("finetune", str(recipe_2d), *COMMON, "output_dir=runs/zero2", "train.batch_size=2",
           "distributed.deepspeed=zero2", "--nproc-per-node", "2", "--master-port", str(free_port()), timeout=1200)
    run = tmp_path / "runs" / "zero2"
    assert (run / "FINISHED").is_file() and sorted(read_metrics(run)) == [1, 2, 3]
    answer = medmvl("infer", "--model", str(run), "--image", str(synth_data / "images" / "test-00000.png"),
                    "--max-new-tokens", "3")
    assert answer.stdout.strip() != ""


def test_deepspeed_zero3_on_two_ranks_matches_one_rank_and_saves_whole_weights(recipe_2d, tmp_path):
    # ZeRO-3 shards every parameter across the ranks (the LLM is even built sharded, inside
    # deepspeed.zero.Init); the saved model must hold the gathered full weights, the same as one
    # plain rank with the doubled batch, not rank 0's empty shards.
    medmvl("finetune", str(recipe_2d), *COMMON, "output_dir=runs/single", "train.batch_size=4")
    medmvl("finetune", str(recipe_2d), *COMMON, "output_dir=runs/zero3", "train.batch_size=2",
           "distributed.deepspeed=zero3", "--nproc-per-node", "2", "--master-port", str(free_port()), timeout=1200)
    single, zero3 = tmp_path / "runs" / "single", tmp_path / "runs" / "zero3"
    assert (zero3 / "FINISHED").is_file()
    losses_single, losses_zero3 = read_metrics(single), read_metrics(zero3)
    assert sorted(losses_zero3) == [1, 2, 3]
    for step in losses_single:
        assert abs(losses_single[step] - losses_zero3[step]) < 1e-4, (step, losses_single[step], losses_zero3[step])
    a = load_file(single / "model" / "model.safetensors")
    b = load_file(zero3 / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_deepspeed_resumes_only_checkpoints_medmvl_checksummed(recipe_2d, tmp_path):
    """DeepSpeed unpickles its global_step* files: a file planted there makes the checkpoint damaged."""
    common = ["-q", "train.logging_steps=1", "train.save_steps=1", "train.save_total_limit=null",
              "distributed.deepspeed=zero2", "output_dir=runs/ds"]
    medmvl("finetune", str(recipe_2d), *common, "train.max_steps=2", "--master-port", str(free_port()), timeout=1200)
    run = tmp_path / "runs" / "ds"
    step2 = run / "checkpoints" / "step-2"
    assert any(p.name.startswith("global_step") for p in step2.iterdir())
    planted = next(step2.glob("global_step*")) / "extra_states.pt"
    planted.write_bytes(b"not medmvl's")
    resumed = medmvl("finetune", str(recipe_2d), *common, "train.max_steps=3", "--resume", "auto",
                     "--master-port", str(free_port()), timeout=1200)
    assert "skipping damaged checkpoint step-2" in resumed.stderr and str(planted) in resumed.stderr
    assert sorted(read_metrics(run)) == [1, 2, 3] and (run / "FINISHED").is_file()
