"""The compiled engines, one extension module each (built by CMake, see cpp/).

ggml's CPU threads are OpenMP threads, and ggml puts an OpenMP barrier between every two ops of a
graph. libgomp spins in a barrier before it sleeps: 300,000 rounds by default, but only 100 once the
process holds more OpenMP threads than CPUs. Each thread that runs a graph keeps a team of its own,
so as soon as a second thread had computed (an embedding, run on a caller's thread; a second model,
on its own engine thread) nearly every barrier became a futex sleep and wake-up, and decode ran
about three times slower for as long as both threads lived (SmolLM2 on 2 cores: 104 -> 32.5 tok/s
after one embedding). Two things keep that from happening:

- Importing this package sets libgomp's defaults before an engine loads it: OMP_WAIT_POLICY=active
  makes that reduced spin 1,000 rounds (libgomp's most), enough for most of ggml's barriers, and
  GOMP_SPINCOUNT=300000 keeps the usual spin otherwise (active alone spins for minutes), after which
  idle threads still sleep. What the user set wins (their own wait policy keeps that policy's spin).
- `release_openmp_team()` lets a thread's team go once it is done computing (an embedding on the
  caller's thread), so that only the engine threads keep theirs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}


def _dlopen_loaded_libgomp() -> ctypes.CDLL | None:
    """libgomp if this process has loaded it already (never loads it)."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except (OSError, AttributeError):  # not loaded, or no RTLD_NOLOAD on this platform
        return None


def _set_omp_defaults() -> None:
    unset = {} if "OMP_WAIT_POLICY" in os.environ else {k: v for k, v in OMP_DEFAULTS.items() if k not in os.environ}
    if unset and _dlopen_loaded_libgomp() is not None:  # it read its environment when it loaded: too late
        logging.getLogger(__name__).warning(
            "libgomp was loaded before pylocalai's engines; set %s before starting Python, or decode may "
            "slow down once a second thread computes", " ".join(f"{k}={v}" for k, v in unset.items()))
    for key, value in unset.items():
        os.environ[key] = value


_set_omp_defaults()

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep nothing else
_gomp: ctypes.CDLL | None = None
_gomp_looked = False
_gomp_lock = threading.Lock()


def _loaded_libgomp() -> ctypes.CDLL | None:
    """libgomp where an engine has loaded it and it has omp_pause_resource_all (OpenMP 5.0, GCC 9)."""
    global _gomp, _gomp_looked
    with _gomp_lock:
        if not _gomp_looked:
            gomp = _dlopen_loaded_libgomp()
            if gomp is not None:  # found once for good; until then, looked for again on each call
                _gomp_looked = True
                _gomp = gomp if hasattr(gomp, "omp_pause_resource_all") else None
        return _gomp


def release_openmp_team() -> None:
    """Let the worker threads that OpenMP keeps for the calling thread go (it starts them again the
    next time this thread computes). For threads that compute now and then, beside an engine thread
    that decodes: while their teams live the process has more OpenMP threads than CPUs, and every
    barrier spins 1,000 rounds instead of 300,000. Frees nothing of any other thread's team. A no-op
    where no engine has loaded libgomp."""
    gomp = _loaded_libgomp()
    if gomp is not None:
        gomp.omp_pause_resource_all(_OMP_PAUSE_SOFT)
