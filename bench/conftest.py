"""Shared set-up of the benchmarks in bench/ (pytest-benchmark; they are not tests, and
`pytest` alone only collects tests/, see pyproject.toml).

- `memcpy_ceiling`: the machine's copy bandwidth measured in the same run (a 256 MiB
  ``copy_``, bytes read + written / median time), the ceiling for every data-moving op.
- ``VTW_BENCH_THREADS=N`` sets torch's thread count for the run.
- `measure(benchmark, fn, bytes_moved)` (a fixture returning the helper): runs `fn` for about ``VTW_BENCH_BUDGET_S`` seconds
  (default 0.4; at least 3 rounds, after one warm-up call), and records the median time, the
  achieved GB/s and the share of the memcpy ceiling in ``benchmark.extra_info``.
- At the end of the session, a table per benchmark group of every benchmark that recorded
  "GB/s" (or "TFLOP/s"): median, throughput, % of the memcpy ceiling, and slowdown against the
  fastest entry of its group, and any paired comparison a benchmark recorded in
  ``extra_info["paired"]`` (alternating calls of two implementations, robust to load drift),
  and any ``extra_info["note"]`` (one line, e.g. a speedup beside its ideal).
  ``--no-vtw-table`` turns it off.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

_CEILING: dict[str, float] = {}
_LOAD: dict[str, tuple[float, float, float]] = {}


def pytest_addoption(parser):
    parser.addoption("--no-vtw-table", action="store_true", default=False,
                     help="vtw: do not print the GB/s summary table at the end of the benchmarks")


def pytest_sessionstart(session):
    if hasattr(os, "getloadavg"):
        _LOAD["start"] = os.getloadavg()
    # VTW_BENCH_THREADS=N: torch (and so at::parallel_for) threads for the whole run. On a
    # machine shared with other jobs, 1 thread gives stable figures: a multi-threaded region
    # waits at its join for every worker, and a descheduled worker costs a scheduler time slice.
    threads = os.environ.get("VTW_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _budget_s() -> float:
    return float(os.environ.get("VTW_BENCH_BUDGET_S", "0.4"))


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(scope="session")
def memcpy_ceiling() -> float:
    """Copy bandwidth of this machine in GB/s, bytes read + written over the median time of a
    256 MiB float32 `dst.copy_(src)` into an allocated, touched buffer, with the torch threads
    the kernels use. Also records `torch.clone` (a fresh output each time, as the ops make),
    which adds the page faults of new memory."""
    x = torch.randn(64 * 2**20)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    _median_time(lambda: y.copy_(x), 2)  # warm-up: first touch of y's pages
    _CEILING["cpu"] = nbytes / _median_time(lambda: y.copy_(x), 9) / 1e9
    del y
    _median_time(lambda: x.clone(), 2)
    _CEILING["cpu_clone"] = nbytes / _median_time(lambda: x.clone(), 9) / 1e9
    _CEILING["cpu_threads"] = torch.get_num_threads()
    return _CEILING["cpu"]


def _measure(benchmark, fn, bytes_moved: float, ceiling_gbs: float | None = None,
             sync=None, first_call_s: float | None = None) -> float:
    """Benchmarks `fn` (adaptive round count, see the module docstring); returns the median
    in seconds. `bytes_moved` is the data the operation must read + write. `first_call_s`:
    the duration of a call the caller already made (e.g. to check the result), which then
    serves as the warm-up and the cost estimate."""
    def call():
        fn()
        if sync is not None:
            sync()

    if first_call_s is None:
        t0 = time.perf_counter()
        call()  # warm-up, and a first estimate of the cost
        first_call_s = time.perf_counter() - t0
    first = first_call_s
    rounds = int(min(200, max(3, _budget_s() / max(first, 1e-6))))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    gbs = bytes_moved / median / 1e9
    benchmark.extra_info["median_ms"] = round(median * 1e3, 4)
    benchmark.extra_info["MB_moved"] = round(bytes_moved / 1e6, 3)
    benchmark.extra_info["GB/s"] = round(gbs, 2)
    if ceiling_gbs:
        benchmark.extra_info["pct_of_memcpy"] = round(100 * gbs / ceiling_gbs, 1)
    return median


@pytest.fixture
def measure():
    """The `_measure` helper, as a fixture (bench/ is no package: importing `conftest` by
    name could pick up tests/conftest.py when both folders run in one session)."""
    return _measure


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--no-vtw-table", default=False):
        return
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session object
    benches = [b for b in getattr(session, "benchmarks", []) or []
               if b.stats and ("GB/s" in b.extra_info or "TFLOP/s" in b.extra_info)]
    if not benches:
        return
    tr = terminalreporter
    tr.write_sep("=", "vtw throughput (median of each benchmark)")
    if "cpu" in _CEILING:
        tr.write_line(f"CPU memcpy ceiling, read + write, {_CEILING['cpu_threads']} torch thread(s): "
                      f"{_CEILING['cpu']:.2f} GB/s (256 MiB copy_ into a touched buffer); "
                      f"{_CEILING['cpu_clone']:.2f} GB/s (torch.clone, new memory each time)")
        tr.write_line("'% memcpy' > 100: the data fit in the caches (small shapes)")
    if "start" in _LOAD and hasattr(os, "getloadavg"):
        s, e = _LOAD["start"], os.getloadavg()
        tr.write_line(f"load average (1 min) at start {s[0]:.2f}, at end {e[0]:.2f}; "
                      f"{os.cpu_count()} CPUs")
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or "(no group)", []).append(b)
    for group, items in groups.items():
        items.sort(key=lambda b: b.stats.median)
        best = items[0].stats.median
        tr.write_line("")
        tr.write_line(f"{group}")
        tr.write_line(f"  {'implementation':<34} {'median':>12} {'throughput':>14} "
                      f"{'% memcpy':>9} {'vs best':>8}")
        for b in items:
            name = b.name.split("[", 1)[-1].rstrip("]") if "[" in b.name else b.name
            impl = b.extra_info.get("impl", name)
            if "GB/s" in b.extra_info:
                thr = f"{b.extra_info['GB/s']:.2f} GB/s"
            else:
                thr = f"{b.extra_info['TFLOP/s']:.4f} TFLOP/s"
            pct = b.extra_info.get("pct_of_memcpy")
            pct_s = f"{pct:.1f}" if pct is not None else "-"
            tr.write_line(f"  {impl:<34} {_fmt_time(b.stats.median):>12} {thr:>14} "
                          f"{pct_s:>9} {b.stats.median / best:>7.2f}x")
        for b in items:
            p = b.extra_info.get("paired")
            if p:
                tr.write_line(f"  paired, alternating calls: {b.extra_info.get('impl', b.name)} / "
                              f"{p['vs']} = {p['ratio']:.3f} median, "
                              f"{p.get('min_ratio', float('nan')):.3f} fastest ({p['rounds']} pairs)")
            if b.extra_info.get("note"):  # e.g. the end-to-end benchmarks' speedup beside the ideal
                tr.write_line(f"  {b.extra_info.get('impl', b.name)}: {b.extra_info['note']}")
