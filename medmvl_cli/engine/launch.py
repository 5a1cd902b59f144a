"""One command from the user, many processes: re-launch the same command under torchrun.

`medmvl finetune R --nproc-per-node 4` becomes `python -m torch.distributed.run --nproc_per_node 4
... -m medmvl_cli finetune R`, as LLaMA-Factory does. DeepSpeed always runs under torchrun (plain
python fails on its MPI discovery), so a DeepSpeed recipe is launched even for one process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the ranks)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(options: LaunchOptions, deepspeed: str | None) -> bool:
    if under_launcher():
        return False
    return options.nproc_per_node > 1 or options.nnodes > 1 or deepspeed is not None


def launch_command(options: LaunchOptions, argv: list[str]) -> list[str]:
    """The torchrun command that re-runs `argv` (the medmvl arguments, distributed flags removed)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={options.nproc_per_node}", f"--nnodes={options.nnodes}",
        f"--node_rank={options.node_rank}", f"--master_addr={options.master_addr}",
        f"--master_port={options.master_port}",
        "-m", "medmvl_cli", *argv,
    ]


def run_launched(command: list[str], options: LaunchOptions) -> int:
    """Run the torchrun command; on CPUs the ranks share medmvl's threads unless the user set OMP_NUM_THREADS."""
    import torch

    from medmvl_cli.threads import current as current_threads

    env = dict(os.environ)
    policy = current_threads()
    if not torch.cuda.is_available() and policy.source != "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = str(max(1, policy.threads // options.nproc_per_node))
    return subprocess.call(command, env=env)


def format_command(command: list[str]) -> str:
    return shlex.join(command)
