"""Small measuring helpers shared by the benchmarks: CPU time of a process, percentiles."""

from __future__ import annotations

import os


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process split into its main thread's and its other threads', user and system."""
    result = {"main_user": 0.0, "main_system": 0.0, "threads_user": 0.0, "threads_system": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        which = "main" if int(tid) == pid else "threads"
        result[f"{which}_user"] += int(fields[11]) / tick
        result[f"{which}_system"] += int(fields[12]) / tick
    return result


def context_switches(pid: int) -> dict[str, int]:
    """Voluntary context switches (times a thread went to sleep, to be woken up later) of a
    process: its main thread's and its other threads' together. Each costs scheduler work
    whatever the load, so per key they show wake-ups saved even on a busy machine."""
    result = {"main": 0, "threads": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, StopIteration):
            continue
        result["main" if int(tid) == pid else "threads"] += switches
    return result


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (nearest rank; 0.0 for none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0
