"""Kernel switches: every ``PMSOLVE_*`` environment variable, in one table, parsed here only.

Each row of :data:`SWITCHES` names a variable, the values it takes, its default, what it
switches and how the default is chosen. Every other module asks this one (``toggle``,
``num_threads``, ``cache_dir``, ``native_lib``); the C++ core reads no environment at all:
``pmsolve._native`` passes the decisions to it once, through the module's switch functions
(``_C.f64_gemm(on)``, ...), right after loading it (:func:`apply_native`).

One syntax for every on/off switch: ``on``/``off``/``auto``, also ``1``/``0`` and
``true``/``false`` (any case, surrounding spaces ignored); unset or empty means ``auto`` unless
the row says otherwise. ``auto`` is the default: for most switches it is a fixed choice, for
some (``rule`` below) it is decided from this machine (CPU vendor and features, the kernels
OpenBLAS selected). Any other value raises :class:`~pmsolve.errors.InputError` naming the
variable and the values it accepts.

When each is read: "load" rows when pmsolve loads its native module (the first solve, or
``pmsolve info``; the CPU backend's routing rows when it is first created), "call" rows at
every use, "build" rows only by ``pip install`` / ``tools/build_cuda.sh`` (listed here for
the docs; nothing at run time reads them). ``pmsolve info`` prints :func:`report`: each
switch, its value and where the value came from ("environment", "default" or "auto-detected").
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .errors import InputError

_ON = ("on", "1", "true")
_OFF = ("off", "0", "false")
TOGGLE_VALUES = "on, off, auto (also 1, 0, true, false)"


@dataclass(frozen=True)
class Switch:
    name: str
    values: str      # what the variable accepts
    default: str     # its value when unset
    effect: str      # what it switches
    rule: str        # how the default is chosen
    read: str        # "load", "call" or "build" (see the module docstring)
    native: str | None = None  # the pmsolve._C function that takes the decision, for on/off rows


SWITCHES: tuple[Switch, ...] = (
    Switch("PMSOLVE_NUM_THREADS", "a positive integer, or auto", "auto",
           "threads of OpenBLAS and of the native kernels' own parallel work",
           "auto: torch.get_num_threads(), so torch.set_num_threads governs both libraries", "call"),
    Switch("PMSOLVE_OPENMP", TOGGLE_VALUES, "auto",
           "the native kernels' parallel work in torch's OpenMP pool (on) or on threads of their own (off)",
           "auto: on; in effect only where exactly one OpenMP runtime is loaded (torch's), else own threads",
           "load", native="openmp"),
    Switch("PMSOLVE_F64_GEMM", TOGGLE_VALUES, "auto",
           "the Cholesky recursion, the solve's GEMMs and its n × n solves from F64_GEMM_SOLVE_MIN_KEYS keys on "
           "pmsolve's AVX-512 fp64 kernel (csrc/f64_gemm.h, csrc/f64_trsm.h) instead of OpenBLAS",
           "auto-detected: on where the CPU has AVX512-F and OpenBLAS's selected kernels lack AVX-512 "
           "(e.g. OPENBLAS_CORETYPE=Haswell)", "load", native="f64_gemm"),
    Switch("PMSOLVE_F32_GRAM", TOGGLE_VALUES, "auto",
           "fp32 statistics on pmsolve's AVX-512 Gram kernel (csrc/f32_gram.h) instead of OpenBLAS's ssyrk",
           "auto-detected: the same rule as PMSOLVE_F64_GEMM", "load", native="f32_gram"),
    Switch("PMSOLVE_AMX", TOGGLE_VALUES, "auto",
           "bf16 statistics on the AMX Gram kernel (csrc/amx_gram.h)",
           "auto: on; in effect only where the CPU has AMX-BF16 and the OS grants the tile state", "load",
           native="amx_bf16"),
    Switch("PMSOLVE_DPBF16", TOGGLE_VALUES, "auto",
           "bf16 statistics on the AVX512-BF16 Gram kernel (csrc/dpbf16_gram.h) where AMX is off or absent; "
           "with both off bf16 is widened to fp32",
           "auto: on; in effect only where the CPU has AVX512-BF16", "load", native="dpbf16_bf16"),
    Switch("PMSOLVE_MKL_POTRF", TOGGLE_VALUES, "auto",
           "factor C with the dpotrf of an MKL already loaded in the process (torch's) instead of pmsolve's "
           "recursion (csrc/loaded_mkl.h)",
           "auto-detected: on on Intel CPUs (MKL is tuned there), off elsewhere; in effect only where an MKL "
           "is loaded", "load", native="mkl_potrf"),
    Switch("PMSOLVE_NATIVE_SOLVE", TOGGLE_VALUES, "auto",
           "the CPU backend's solve natively from a few keys on (pmsolve.backends.cpu.NATIVE_TRSM_MIN_N), "
           "or (off) through torch at every number of keys",
           "auto-detected: off on Intel CPUs whose torch has MKL (MKL's triangular solves are faster there), "
           "else on", "load"),
    Switch("PMSOLVE_NATIVE_COND_SOLVES", TOGGLE_VALUES, "auto",
           "the condition estimate's triangular solves on _C.spd_apply_inverse (on) or through torch (off)",
           "auto-detected: the same rule as PMSOLVE_NATIVE_SOLVE", "load"),
    Switch("PMSOLVE_CACHE", "a directory", "~/.cache/pmsolve",
           "where statistics, converted models, context templates and baselines are cached", "fixed", "call"),
    Switch("PMSOLVE_NATIVE_LIB", "a path to a _C*.so", "the installed pmsolve/_C*.so",
           "load this build of pmsolve._C instead (a build folder's, e.g. tools/build_cuda.sh's)", "fixed", "load"),
    Switch("PMSOLVE_CUDA", "1 or unset", "unset",
           "build the CUDA backend too (setup.py; needs nvcc and the cuBLAS/cuSOLVER wheels)", "fixed", "build"),
    Switch("PMSOLVE_CUDA_LIB_ROOT", "a directory", "the nvidia/cu13 folder of the build's Python",
           "where csrc/cuda/cuda.cmake finds cuBLAS/cuSOLVER headers and libraries", "fixed", "build"),
    Switch("PMSOLVE_BUILD_TYPE", "a CMake build type", "Release", "CMAKE_BUILD_TYPE of setup.py's build", "fixed",
           "build"),
)

BY_NAME: dict[str, Switch] = {s.name: s for s in SWITCHES}


@dataclass(frozen=True)
class Resolved:
    """A switch's value now and where it came from: "environment", "default" or "auto-detected"."""
    value: Any
    source: str
    why: str | None = None  # for auto-detected values: what was detected


def _raw(name: str) -> str | None:
    """The variable's text, None when unset or blank."""
    raw = os.environ.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def parse_toggle(name: str, raw: str | None) -> bool | None:
    """on -> True, off -> False, auto (or unset) -> None; anything else is an InputError."""
    if raw is None or not raw.strip():
        return None
    word = raw.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    if word == "auto":
        return None
    raise InputError(f"{name}={raw!r} is not a valid value; use {TOGGLE_VALUES}")


def parse_threads(raw: str | None) -> int | None:
    """A positive integer, or None for auto (unset or "auto")."""
    if raw is None or not raw.strip() or raw.strip().lower() == "auto":
        return None
    text = raw.strip()
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"PMSOLVE_NUM_THREADS={raw!r} is not a valid value; use a positive integer or auto")
    return int(text)


# ---------------------------------------------------------------------------
# what "auto" detects
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), "" if unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _intel_with_mkl() -> tuple[bool, str]:
    import torch

    intel = cpu_vendor() == "GenuineIntel"
    mkl = torch.backends.mkl.is_available()
    return intel and mkl, f"CPU vendor {cpu_vendor() or 'unknown'}, torch {'with' if mkl else 'without'} MKL"


def _narrower_blas(mod: ModuleType | None) -> tuple[bool, str]:
    if mod is None or not hasattr(mod, "openblas_core_has_avx512"):
        return False, "no native module"
    if not mod.f64_gemm_available():
        return False, "the CPU lacks AVX512-F"
    core = mod.blas_config().rsplit("core=", 1)[-1].split()[0] if "core=" in mod.blas_config() else "?"
    if mod.openblas_core_has_avx512():
        return False, f"OpenBLAS runs its AVX-512 kernels ({core})"
    return True, f"OpenBLAS runs kernels without AVX-512 ({core}) on this AVX-512 CPU"


def _intel(mod: ModuleType | None) -> tuple[bool, str]:
    return cpu_vendor() == "GenuineIntel", f"CPU vendor {cpu_vendor() or 'unknown'}"


def _not_intel_with_mkl(mod: ModuleType | None) -> tuple[bool, str]:
    on, why = _intel_with_mkl()
    return not on, why


# Rows whose auto value depends on the machine; the others' auto is "on".
_DETECT: dict[str, Callable[[ModuleType | None], tuple[bool, str]]] = {
    "PMSOLVE_F64_GEMM": _narrower_blas,
    "PMSOLVE_F32_GRAM": _narrower_blas,
    "PMSOLVE_MKL_POTRF": _intel,
    "PMSOLVE_NATIVE_SOLVE": _not_intel_with_mkl,
    "PMSOLVE_NATIVE_COND_SOLVES": _not_intel_with_mkl,
}


# ---------------------------------------------------------------------------
# the values
# ---------------------------------------------------------------------------


def toggle(name: str, mod: ModuleType | None = None) -> Resolved:
    """An on/off switch: True/False and its source. ``mod``: the native module, for rules that
    ask it (the kernels OpenBLAS selected); defaults to pmsolve's loaded one."""
    sw = BY_NAME.get(name)
    if sw is None or sw.values != TOGGLE_VALUES:
        toggles = [s.name for s in SWITCHES if s.values == TOGGLE_VALUES]
        raise KeyError(f"{name} is not an on/off switch; those are {toggles}")
    explicit = parse_toggle(name, _raw(name))
    if explicit is not None:
        return Resolved(explicit, "environment")
    detect = _DETECT.get(name)
    if detect is None:
        return Resolved(True, "default")
    if mod is None and detect is _narrower_blas:
        from ._native import native

        mod = native()
    on, why = detect(mod)
    return Resolved(on, "auto-detected", why)


def num_threads() -> Resolved:
    """PMSOLVE_NUM_THREADS, else torch's intra-op thread count (read at every call)."""
    n = parse_threads(_raw("PMSOLVE_NUM_THREADS"))
    if n is not None:
        return Resolved(n, "environment")
    import torch

    return Resolved(torch.get_num_threads(), "default")


def cache_dir() -> Path:
    """The cache root: $PMSOLVE_CACHE, else ~/.cache/pmsolve (read at every call)."""
    raw = _raw("PMSOLVE_CACHE")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "pmsolve"


def native_lib() -> str | None:
    """$PMSOLVE_NATIVE_LIB: the path of a _C*.so to load instead of the installed one, or None."""
    return _raw("PMSOLVE_NATIVE_LIB")


def check_environment() -> None:
    """Parse every run-time switch now: the first bad value raises InputError."""
    for sw in SWITCHES:
        if sw.values == TOGGLE_VALUES:
            parse_toggle(sw.name, _raw(sw.name))
    parse_threads(_raw("PMSOLVE_NUM_THREADS"))


def apply_native(mod: ModuleType) -> None:
    """Hand every native switch's decision to the module (called once, when pmsolve loads it).
    A stale build that lacks a switch function is skipped here; the backends reject it anyway."""
    for sw in SWITCHES:
        if sw.native is not None and hasattr(mod, sw.native):
            getattr(mod, sw.native)(bool(toggle(sw.name, mod).value))


def report(mod: ModuleType | None = None) -> dict[str, dict[str, Any]]:
    """Every switch: its value, where the value came from, and for native switches whether the
    kernel is in effect now (the module may keep it off where the CPU or the process cannot run
    it, and code may have switched it since). Build-time rows show the variable as set, if set."""
    if mod is None:
        from ._native import native

        mod = native()
    out: dict[str, dict[str, Any]] = {}
    for sw in SWITCHES:
        if sw.values == TOGGLE_VALUES:
            r = toggle(sw.name, mod)
            row: dict[str, Any] = {"value": "on" if r.value else "off", "source": r.source}
            if r.why:
                row["detected"] = r.why
            if sw.native is not None:
                ask = getattr(mod, sw.native, None) if mod is not None else None
                row["in_effect"] = bool(ask()) if ask is not None else None
        elif sw.name == "PMSOLVE_NUM_THREADS":
            r = num_threads()
            row = {"value": r.value, "source": r.source}
        elif sw.name == "PMSOLVE_CACHE":
            row = {"value": str(cache_dir()), "source": "environment" if _raw(sw.name) else "default"}
        else:
            raw = _raw(sw.name)
            row = {"value": raw if raw is not None else sw.default, "source": "environment" if raw else "default"}
        if sw.read == "build":
            row["read"] = "at build time only"
        out[sw.name] = row
    return out
