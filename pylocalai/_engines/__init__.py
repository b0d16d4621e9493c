"""The compiled engines, one extension module each (built by CMake, see cpp/).

Importing this package first sets libgomp's defaults, before an engine loads it: ggml's CPU threads
are OpenMP threads, and ggml puts an OpenMP barrier between every two ops of a graph. libgomp's
barrier spins (300,000 rounds) before it sleeps, except once the process holds more OpenMP threads
than CPUs: then it spins 1,000 rounds only. Each thread that runs a graph keeps its own team, so as
soon as a second thread has computed (an embedding, run from a caller's thread; a second model, on
its own engine thread) every barrier became a futex sleep and wake-up, and decode ran about three
times slower for as long as both threads lived (SmolLM2 on 2 cores: 95 -> 33 tok/s after one
embedding). OMP_WAIT_POLICY=active keeps the full spin in that case, and GOMP_SPINCOUNT keeps
libgomp's usual length for it, after which idle threads still sleep. What the user set wins (a
wait policy of their own keeps the spin that policy gives).
"""

from __future__ import annotations

import logging
import os

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def _set_omp_defaults() -> None:
    unset = {} if "OMP_WAIT_POLICY" in os.environ else {k: v for k, v in OMP_DEFAULTS.items() if k not in os.environ}
    if unset and _libgomp_loaded():  # it read its environment when it loaded: too late to set it here
        logging.getLogger(__name__).warning(
            "libgomp was loaded before pylocalai's engines; set %s before starting Python, or decode may "
            "slow down once a second thread computes", " ".join(f"{k}={v}" for k, v in unset.items()))
    for key, value in unset.items():
        os.environ[key] = value


_set_omp_defaults()
