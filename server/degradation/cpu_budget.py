"""The CPU a process may really use: its budget of cores.

``os.cpu_count()`` counts the machine's cores and ``sched_getaffinity`` the ones
this process may be scheduled on; neither knows a cgroup's CPU *quota*, which is
how a container (``docker run --cpus 4``, compose ``cpus:``, a Kubernetes CPU
limit) is held to a share of the machine.  A pod limited to 4 CPUs on a 64-core
node sees 64 cores and 64 in its affinity set; sized for 64, its processes spend
the quota fighting each other.  The budget is the smallest of

* the affinity set (``taskset``, ``--cpuset-cpus``),
* the cgroup quota of this process's cgroup and its ancestors: cgroup v2
  ``cpu.max`` (``"400000 100000"`` = 4 CPUs, ``"max ..."`` = none) or v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us`` (``-1`` = none),
* an explicit limit: ``--cpus N`` on the commands, else ``$DEGRADE_CPUS``,

rounded up to whole cores (a quota of 1.5 CPUs runs two single-threaded
workers, each getting three quarters of a core; nothing spins, so nothing is
wasted).  Everything that sizes itself sizes from it: worker processes, the
split pipeline's codec pool, the start-up scan's and the fingerprint's threads,
DALI's threads.  This module sits at the bottom of ``server`` (it imports
nothing of it) so that every part can.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

#: the environment variable of the explicit limit (the commands' ``--cpus`` wins over it)
ENV = "DEGRADE_CPUS"
#: where the cgroup file systems are mounted
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """The cores this process may use (``cores``, a whole number >= 1) and what limits them."""

    cores: int
    limit: float              # the exact limit before rounding (e.g. 1.5 for a quota of 150 ms per 100 ms)
    source: str               # "affinity", "cgroup quota" or the explicit limit's origin ("--cpus", "$DEGRADE_CPUS")
    host_cores: int           # cores of the machine
    affinity: int             # cores in this process's affinity set
    quota: float | None       # the cgroup quota in CPUs, None if there is none
    explicit: float | None    # the explicit limit, None if none was given

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``CPU budget: 4 of 64 cores (cgroup quota)``."""
        what = self.source
        if self.limit != self.cores:
            what += f" {self.limit:g} CPUs, rounded up"
        others = []
        if self.source != "affinity" and self.affinity != self.host_cores:
            others.append(f"affinity {self.affinity}")
        if self.quota is not None and self.source != "cgroup quota":
            others.append(f"cgroup quota {self.quota:g}")
        tail = f"; {', '.join(others)}" if others else ""
        return f"CPU budget: {self.cores} of {self.host_cores} cores ({what}{tail})"


def parse_cpus(value: str | float | int | None, what: str = "--cpus") -> float | None:
    """An explicit limit as given on a command line or in the environment: a positive number of CPUs
    (fractions allowed), or None for none ('' or '0' or 'auto')."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto", "0"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{what} must be a positive number of CPUs (e.g. 4 or 1.5), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a positive number of CPUs (e.g. 4 or 1.5), got {value!r}")
    return float(value) or None


def _affinity() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """``root/a/b/c``, ``root/a/b``, ``root/a``, ``root``: a quota set on any of them holds this cgroup.
    Inside a container's cgroup namespace the path is ``/`` and ``root`` itself is the container's cgroup."""
    parts = [p for p in cgroup_path.strip().split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if len(fields) < 1 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_quota(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup, the smallest along its ancestors; None if none.

    ``proc_cgroup``: the text of ``/proc/self/cgroup`` (read when None); ``root``: where the cgroup
    file systems are mounted.  Both are parameters so that tests can use fake cgroup trees."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    found: list[float] = []
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":  # cgroup v2 (the unified hierarchy)
            mounts, read = [root, root / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):  # cgroup v1's cpu controller
            mounts, read = [root / controllers, root / "cpu", root / "cpu,cpuacct"], _v1_quota
        else:
            continue
        for mount in dict.fromkeys(mounts):  # the first mount point that has this hierarchy's files
            if not mount.is_dir():
                continue
            quotas = [q for d in _ancestors(mount, path) if (q := read(d)) is not None]
            if quotas:
                found.append(min(quotas))
                break
    return min(found) if found else None


def cpu_budget(cpus: float | str | None = None, *, environ: Mapping[str, str] | None = None,
               proc_cgroup: str | None = None, root: Path = CGROUP_ROOT,
               affinity: int | None = None) -> CpuBudget:
    """The budget of this process: affinity, cgroup quota and the explicit limit ``cpus`` (else
    ``$DEGRADE_CPUS``), the smallest, rounded up to whole cores.  The keyword arguments stand in for
    the machine in tests."""
    env = os.environ if environ is None else environ
    source = "--cpus"
    explicit = parse_cpus(cpus)
    if explicit is None:
        explicit, source = parse_cpus(env.get(ENV), f"${ENV}"), f"${ENV}"
    aff = _affinity() if affinity is None else max(1, int(affinity))
    quota = cgroup_quota(proc_cgroup, root)
    candidates = [(float(aff), "affinity")]
    if quota is not None:
        candidates.append((quota, "cgroup quota"))
    if explicit is not None:
        candidates.append((explicit, source))
    limit, why = min(candidates, key=lambda c: c[0])  # ties: the first (the machine's own limit) names it
    return CpuBudget(cores=max(1, math.ceil(limit - 1e-9)), limit=limit, source=why,
                     host_cores=max(aff, os.cpu_count() or aff), affinity=aff, quota=quota, explicit=explicit)


def budget_threads(cap: int) -> int:
    """Threads for a helper pool (scan, hashing, DALI): the CPU budget's cores, at most ``cap``."""
    return max(1, min(int(cap), cpu_budget().cores))


__all__ = ["CGROUP_ROOT", "ENV", "CpuBudget", "budget_threads", "cgroup_quota", "cpu_budget", "parse_cpus"]
