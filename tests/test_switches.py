"""The kernel switch table (pmsolve/switches.py): one syntax for every PMSOLVE_* variable, bad
values as typed errors, the table shown by `pmsolve info`, no other place reading the variables,
and a switch set in the environment changing the kernel that runs (in a fresh process, since the
native module takes its switches once, when it loads), with both settings checked against the
torch backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pmsolve import switches
from pmsolve._native import native
from pmsolve.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TOGGLES = [s.name for s in switches.SWITCHES if s.values == switches.TOGGLE_VALUES]


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["on", "ON", " On ", "1", "true", "True"])
def test_toggle_on_words(raw):
    assert switches.parse_toggle("PMSOLVE_X", raw) is True


@pytest.mark.parametrize("raw", ["off", "OFF", "0", "false", " FALSE\n"])
def test_toggle_off_words(raw):
    assert switches.parse_toggle("PMSOLVE_X", raw) is False


@pytest.mark.parametrize("raw", [None, "", "  ", "auto", "AUTO"])
def test_toggle_auto_or_unset(raw):
    assert switches.parse_toggle("PMSOLVE_X", raw) is None


@pytest.mark.parametrize("raw", ["2", "yes", "enable", "o n", "-1", "auto1"])
def test_bad_toggle_names_the_variable_and_the_values(raw):
    with pytest.raises(InputError) as info:
        switches.parse_toggle("PMSOLVE_F64_GEMM", raw)
    msg = str(info.value)
    assert "PMSOLVE_F64_GEMM" in msg and repr(raw) in msg
    assert all(word in msg for word in ("on", "off", "auto", "1", "0", "true", "false"))


@pytest.mark.parametrize("raw, want", [("3", 3), (" 1 ", 1), ("auto", None), ("", None), (None, None)])
def test_thread_count(raw, want):
    assert switches.parse_threads(raw) == want


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_bad_thread_count(raw):
    with pytest.raises(InputError, match="PMSOLVE_NUM_THREADS.*positive integer or auto"):
        switches.parse_threads(raw)


def test_values_and_sources_follow_the_environment(monkeypatch):
    for name in TOGGLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMSOLVE_NATIVE_COND_SOLVES", "false")
    assert switches.toggle("PMSOLVE_NATIVE_COND_SOLVES") == switches.Resolved(False, "environment")
    monkeypatch.setenv("PMSOLVE_AMX", "1")
    assert switches.toggle("PMSOLVE_AMX") == switches.Resolved(True, "environment")
    # A fixed default, unset or spelled out:
    monkeypatch.delenv("PMSOLVE_AMX")
    assert switches.toggle("PMSOLVE_AMX") == switches.Resolved(True, "default")
    monkeypatch.setenv("PMSOLVE_AMX", "auto")
    assert switches.toggle("PMSOLVE_AMX") == switches.Resolved(True, "default")
    # A rule from the machine: the CPU vendor, read here independently of the module.
    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), "")
    r = switches.toggle("PMSOLVE_MKL_POTRF")
    assert (r.value, r.source) == (vendor == "GenuineIntel", "auto-detected") and vendor in r.why
    intel_mkl = vendor == "GenuineIntel" and torch.backends.mkl.is_available()
    assert switches.toggle("PMSOLVE_NATIVE_SOLVE").value is (not intel_mkl)
    monkeypatch.setenv("PMSOLVE_NUM_THREADS", "3")
    assert switches.num_threads() == switches.Resolved(3, "environment")
    monkeypatch.delenv("PMSOLVE_NUM_THREADS")
    assert switches.num_threads() == switches.Resolved(torch.get_num_threads(), "default")
    monkeypatch.setenv("PMSOLVE_CACHE", "/tmp/pmsolve-cache-test")
    assert switches.cache_dir() == Path("/tmp/pmsolve-cache-test")
    monkeypatch.setenv("PMSOLVE_F32_GRAM", "sometimes")
    with pytest.raises(InputError, match="PMSOLVE_F32_GRAM"):
        switches.check_environment()
    with pytest.raises(KeyError):
        switches.toggle("PMSOLVE_CACHE")  # not an on/off switch


def test_avx512_kernels_auto_rule():
    """On where the CPU has AVX512-F and OpenBLAS's selected core (read from its config string
    here) is not one of its AVX-512 kernel sets."""
    mod = native()
    if mod is None:
        pytest.skip("needs the native module")
    core = mod.blas_config().rsplit("core=", 1)[1].split()[0].lower()
    want = mod.f64_gemm_available() and core not in ("skylakex", "cooperlake", "sapphirerapids")
    for name in ("PMSOLVE_F64_GEMM", "PMSOLVE_F32_GRAM"):
        if os.environ.get(name, "").strip().lower() in ("", "auto"):
            r = switches.toggle(name, mod)
            assert (r.value, r.source) == (want, "auto-detected"), name


# ---------------------------------------------------------------------------
# one place: the table covers every variable, and nothing else reads them
# ---------------------------------------------------------------------------


def test_no_native_code_reads_the_environment():
    hits = [f"{p.relative_to(ROOT)}" for d in ("csrc", "bindings") for p in (ROOT / d).rglob("*")
            if p.suffix in (".cpp", ".h", ".cu", ".cuh") and re.search(r"\bgetenv\b|\benviron\b", p.read_text())]
    assert hits == []


def test_only_the_switch_module_reads_pmsolve_variables():
    """pmsolve/ reads PMSOLVE_* only through pmsolve/switches.py; every PMSOLVE_* variable the
    build reads (setup.py, CMake, tools/) is a row of the table."""
    readers = []
    for p in (ROOT / "pmsolve").rglob("*.py"):
        text = p.read_text()
        if p.name != "switches.py" and re.search(
                r"(environ(\.get|\.setdefault|\.pop)?\s*[\[(]|getenv\s*\()\s*f?[\"']PMSOLVE_", text):
            readers.append(str(p.relative_to(ROOT)))
    assert readers == []
    build = [ROOT / "setup.py", ROOT / "tools" / "build_cuda.sh", ROOT / "csrc" / "cuda" / "cuda.cmake"]
    read = set()
    for p in build:
        text = p.read_text()
        read |= set(re.findall(r"environ\.get\(\s*[\"'](PMSOLVE_\w+)", text))
        read |= set(re.findall(r"\$ENV\{(PMSOLVE_\w+)\}", text))
    assert read, "found no build-time variables: the patterns above no longer match the build files"
    assert read <= set(switches.BY_NAME), read - set(switches.BY_NAME)


def test_native_rows_name_the_module_functions():
    mod = native()
    if mod is None:
        pytest.skip("needs the native module")
    for sw in switches.SWITCHES:
        if sw.native is not None:
            assert sw.values == switches.TOGGLE_VALUES
            assert callable(getattr(mod, sw.native)), sw.name


def test_the_api_doc_lists_every_switch():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [s.name for s in switches.SWITCHES if f"`{s.name}`" not in doc]
    assert missing == []


def test_info_shows_the_table(capsys, monkeypatch):
    from pmsolve.cli import main

    monkeypatch.setenv("PMSOLVE_NATIVE_COND_SOLVES", "off")
    monkeypatch.setenv("PMSOLVE_NUM_THREADS", "1")
    assert main(["info"]) == 0
    table = json.loads(capsys.readouterr().out)["switches"]
    assert list(table) == [s.name for s in switches.SWITCHES]
    assert table["PMSOLVE_NATIVE_COND_SOLVES"] == {"value": "off", "source": "environment"}
    assert table["PMSOLVE_NUM_THREADS"] == {"value": 1, "source": "environment"}
    assert table["PMSOLVE_CUDA"]["read"] == "at build time only"
    for name in TOGGLES:
        assert table[name]["value"] in ("on", "off")
        assert table[name]["source"] in ("default", "auto-detected", "environment")


# ---------------------------------------------------------------------------
# a switch set in the environment changes what runs (fresh processes)
# ---------------------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import json, sys, torch, pmsolve
    from pmsolve._native import native
    from pmsolve.backends import cpu

    g = torch.Generator().manual_seed(5)
    d, n = 1300, 32  # above the recursion's cutoff (1024) and F64_GEMM_SOLVE_MIN_KEYS (16)
    A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    C = A @ A.mT / (2 * d)
    K = torch.randn(d, n, generator=g, dtype=torch.float64)
    R = torch.randn(8, n, generator=g, dtype=torch.float64)
    out = {}
    for be in ("cpu", "torch"):
        f = pmsolve.factorize(C, backend=be, jitter=None)
        u = pmsolve.solve(f, K, R, backend=be)
        out[be] = (f.L, u.B)
    # The cpu backend's solve and the torch backend's on one factor (the torch one's).
    from pmsolve.backends import get_backend
    from pmsolve.backends.torch_backend import TorchBackend
    L = out["torch"][0]
    out["same_L"] = (get_backend("cpu", L.device).pm_solve(L, K, [0.0], 1e12).B,
                     TorchBackend().pm_solve(L, K, [0.0], 1e12).B)
    torch.save(out, sys.argv[1])
    mod = native()
    print(json.dumps({"f64_gemm": mod.f64_gemm(), "min_n": cpu.NATIVE_TRSM_MIN_N,
                      "cond_native": cpu.NATIVE_COND_SOLVES, "threads": mod.blas_get_num_threads()}))
    """
)


def _probe(tmp_path: Path, **env: str):
    path = tmp_path / f"probe-{'-'.join(f'{k}{v}' for k, v in env.items())}.pt"
    full = {k: v for k, v in os.environ.items() if not k.startswith("PMSOLVE_")} | env
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=full, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), torch.load(path)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.native
def test_f64_gemm_switch_changes_the_kernel_and_both_agree_with_torch(tmp_path):
    mod = native()
    if mod is None:
        pytest.skip("needs the native module")
    if not mod.f64_gemm_available():
        pytest.skip("the CPU lacks AVX512-F: the kernel cannot run here")
    # MKL's dpotrf would take the factorisation whatever the kernel switch says.
    runs = {v: _probe(tmp_path, PMSOLVE_F64_GEMM=v, PMSOLVE_MKL_POTRF="off") for v in ("on", "0")}
    assert runs["on"][0]["f64_gemm"] is True and runs["0"][0]["f64_gemm"] is False
    for state, got in runs.values():
        L_torch, B_torch = got["torch"]
        L, B = got["cpu"]
        # C's condition number is about 34 (Marchenko-Pastur, aspect 1/2): backward-stable
        # factorisations and solves agree to ~d·κ·ε ≈ 1e-11.
        assert _rel(L, L_torch) < 1e-10, state
        assert _rel(B, B_torch) < 1e-9, state
    # Different kernels, different rounding: the factor is not bitwise the same.
    assert not torch.equal(runs["on"][1]["cpu"][0], runs["0"][1]["cpu"][0])


@pytest.mark.native
def test_native_solve_switch_routes_the_solve_through_torch(tmp_path):
    if native() is None:
        pytest.skip("needs the native module")
    off, got_off = _probe(tmp_path, PMSOLVE_NATIVE_SOLVE="false", PMSOLVE_NATIVE_COND_SOLVES="0",
                          PMSOLVE_NUM_THREADS="1")
    on, got_on = _probe(tmp_path, PMSOLVE_NATIVE_SOLVE="true", PMSOLVE_NATIVE_COND_SOLVES="ON")
    assert (off["min_n"], off["cond_native"], off["threads"]) == (sys.maxsize, False, 1)
    assert (on["min_n"], on["cond_native"]) == (4, True)
    # Off: the cpu backend hands the whole solve to the torch backend, so on one factor its B
    # is the torch backend's bit for bit; on: the native solves, equal to rounding.
    assert torch.equal(*got_off["same_L"])
    assert _rel(*got_on["same_L"]) < 1e-9
    for got in (got_off, got_on):
        assert _rel(got["cpu"][1], got["torch"][1]) < 1e-9


_NATIVE_STATE = textwrap.dedent(
    """
    import json
    from pmsolve import switches
    from pmsolve._native import native
    mod = native()
    print(json.dumps({s.name: getattr(mod, s.native)() for s in switches.SWITCHES if s.native}))
    """
)


@pytest.mark.native
def test_every_native_switch_reaches_the_module():
    """All off in the environment: every kernel off in a fresh process. All on: on wherever the
    module can run it (its own availability probes, independent of the table)."""
    mod = native()
    if mod is None:
        pytest.skip("needs the native module")
    possible = {"PMSOLVE_OPENMP": len(mod.openmp_runtimes()) == 1, "PMSOLVE_F64_GEMM": mod.f64_gemm_available(),
                "PMSOLVE_F32_GRAM": mod.f32_gram_available(), "PMSOLVE_AMX": mod.amx_bf16_available(),
                "PMSOLVE_DPBF16": mod.dpbf16_available(), "PMSOLVE_MKL_POTRF": bool(mod.loaded_mkl_path())}
    assert set(possible) == {s.name for s in switches.SWITCHES if s.native}
    base = {k: v for k, v in os.environ.items() if not k.startswith("PMSOLVE_")}
    for word, want in (("off", dict.fromkeys(possible, False)), ("true", possible)):
        out = subprocess.run([sys.executable, "-c", _NATIVE_STATE], env=base | dict.fromkeys(possible, word),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == want, word


def test_bad_value_is_a_typed_error_where_the_native_module_loads(tmp_path):
    script = textwrap.dedent(
        """
        import torch, pmsolve
        try:
            pmsolve.factorize(torch.eye(4, dtype=torch.float64))
        except pmsolve.InputError as exc:
            print("InputError:", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMSOLVE_")} | {"PMSOLVE_OPENMP": "maybe"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("InputError: PMSOLVE_OPENMP='maybe'"), out.stdout
    cli = subprocess.run([sys.executable, "-m", "pmsolve.cli", "info"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 2 and "PMSOLVE_OPENMP='maybe'" in cli.stderr, cli.stderr


# ---------------------------------------------------------------------------
# CI: the run ends with the skipped tests counted per reason (tests/conftest.py)
# ---------------------------------------------------------------------------


def test_skip_reasons_are_tallied_at_the_end(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_some.py").write_text(textwrap.dedent(
        """
        import pytest

        @pytest.mark.parametrize("i", [1, 2])
        def test_needs_a(i):
            pytest.skip("no device A")

        @pytest.mark.skipif(True, reason="no device B")
        def test_needs_b():
            pass

        def test_runs():
            pass
        """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tail = out.stdout[out.stdout.index("skipped: 3 tests, by reason"):]
    assert re.search(r"^\s+2  no device A$", tail, re.M) and re.search(r"^\s+1  no device B$", tail, re.M), tail
