"""The thread policy: what is available now, not the core count; the user's word first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medmvl_cli import threads


@pytest.fixture
def machine(monkeypatch):
    """A machine with `cpus` CPUs under a 1-minute load of `load`, and an environment without settings."""

    def make(cpus: float, load: float, **environment):
        monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
        monkeypatch.setattr(threads, "_load", lambda: load)
        base = {"MEDMVL_THREADS": None, "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None}
        monkeypatch.setattr(threads, "_ENVIRONMENT", {**base, **environment})

    return make


@pytest.mark.parametrize("cpus, load, expected, wait", [
    (2, 0.1, 2, "ACTIVE"),     # an idle laptop: every core, threads spin briefly at barriers
    (2, 1.2, 2, "PASSIVE"),    # the tail of the previous run in the 1-minute average: still every core
    (2, 1.6, 1, "PASSIVE"),
    (2, 7.5, 1, "PASSIVE"),    # a busy shared server: one thread, and waiting threads sleep
    (16, 6.0, 11, "ACTIVE"),   # what the others leave
    (16, 12.2, 5, "PASSIVE"),
    (1, 0.0, 1, "ACTIVE"),
])
def test_auto_takes_what_the_load_leaves(machine, cpus, load, expected, wait):
    machine(cpus, load)
    policy = threads.choose()
    assert (policy.threads, policy.source, policy.wait_policy) == (expected, "auto", wait)


def test_the_users_word_comes_first(machine):
    machine(2, 7.5, OMP_NUM_THREADS="3", MEDMVL_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    assert (threads.choose(5).threads, threads.choose(5).source) == (5, "--threads")
    assert (threads.choose().threads, threads.choose().source) == (2, "MEDMVL_THREADS")
    assert threads.choose().wait_policy == "ACTIVE"
    machine(2, 7.5, OMP_NUM_THREADS="3", MEDMVL_THREADS="zero")
    assert (threads.choose().threads, threads.choose().source) == (3, "OMP_NUM_THREADS")


def test_the_choice_reaches_torch_and_medmvl_env():
    env = {key: value for key, value in os.environ.items() if key not in ("MEDMVL_THREADS", "OMP_NUM_THREADS")}
    code = ("import sys, json; from medmvl_cli.cli.app import main\n"
            "sys.argv = ['medmvl', '--threads', '1', 'env', '--json']; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout)
    assert info["cpu_threads"] == 1
    assert info["thread_policy"]["threads"] == 1 and info["thread_policy"]["source"] == "--threads"
