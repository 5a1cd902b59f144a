"""How many CPU threads medmvl computes with: what this process may use now, not the core count.

On a shared machine the core count is a bad guide: with the cores already busy, a parallel region
of N OpenMP threads waits at every barrier for the thread the OS has not scheduled, and idle
threads spin while they wait, burning the CPU time the others need (a 25x slowdown where a fair
share explains 4x). So, unless told otherwise, medmvl takes the CPUs it may run on (affinity and
cgroup quota) less the load already on them (with half a core to spare for the average's lag), at least one, and lets waiting threads sleep
(`OMP_WAIT_POLICY=PASSIVE`) whenever it shares the machine.

Order of precedence: `medmvl --threads N`, then `$MEDMVL_THREADS`, then `$OMP_NUM_THREADS`, then
the automatic choice. The choice is exported as `OMP_NUM_THREADS` / `MKL_NUM_THREADS` so that
torch (imported later), SimpleITK and child processes (torchrun ranks) follow it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int
    source: str  # "--threads", "MEDMVL_THREADS", "OMP_NUM_THREADS" or "auto"
    cpus: float  # CPUs this process may run on
    load: float | None  # 1-minute load average when the choice was made
    wait_policy: str  # OMP_WAIT_POLICY in force

    def describe(self) -> str:
        load = f", load average {self.load:.1f}" if self.load is not None else ""
        return (f"{self.threads} ({self.source}; {self.cpus:g} CPU(s) available{load}; "
                f"OMP_WAIT_POLICY={self.wait_policy})")

    def to_dict(self) -> dict:
        return asdict(self)


_current: ThreadPolicy | None = None
# What the user's environment said before medmvl exported its own choice (a torchrun rank inherits
# the per-rank count its launcher set, and takes it as given).
_ENVIRONMENT = {name: os.environ.get(name) for name in ("MEDMVL_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}


def _cgroup_quota() -> float | None:
    """CPUs granted by a cgroup CPU quota (containers, job schedulers), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> float:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def choose(requested: int | None = None) -> ThreadPolicy:
    """The thread count to use, by the order of precedence above."""
    cpus, load = available_cpus(), _load()
    asked = (("--threads", requested), ("MEDMVL_THREADS", _positive_int(_ENVIRONMENT["MEDMVL_THREADS"])),
             ("OMP_NUM_THREADS", _positive_int(_ENVIRONMENT["OMP_NUM_THREADS"])))
    for source, value in asked:  # noqa: B007 -- `source` is read after the break
        if value:
            threads = int(value)
            break
    else:
        source = "auto"
        # Generous by half a core: the 1-minute average lags, and often holds the tail of medmvl's
        # own previous run, which should not cost the next run a thread.
        idle = cpus - (load or 0.0)
        threads = max(1, min(math.floor(cpus), math.ceil(idle + 0.5)))
    shared = load is not None and load > 0.5 * cpus
    wait_policy = _ENVIRONMENT["OMP_WAIT_POLICY"] or ("PASSIVE" if shared else "ACTIVE")
    return ThreadPolicy(threads, source, cpus, load, wait_policy)


def apply(policy: ThreadPolicy) -> ThreadPolicy:
    """Export the policy to the environment (before torch is imported) and to torch if it already is."""
    global _current
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(policy.threads)
    os.environ["OMP_WAIT_POLICY"] = policy.wait_policy  # read once, when torch's OpenMP starts
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(policy.threads)
    _current = policy
    return policy


def current() -> ThreadPolicy:
    """The policy in force (chosen automatically if no command set one)."""
    return _current or apply(choose())
