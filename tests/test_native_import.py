"""``import pmsolve._C`` on its own, in a fresh interpreter: the extension finds the BLAS wheel's
library through its run-time search path, not because pmsolve/_native.py loaded it first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pmsolve

PACKAGE = Path(pmsolve.__file__).resolve().parent


@pytest.mark.native
def test_import_pmsolve_C_first_in_a_fresh_interpreter():
    if not list(PACKAGE.glob("_C*.so")):
        pytest.skip(f"the native module is not built in {PACKAGE} (pip install -e .)")
    code = ("import sys\n"
            "import pmsolve._C as C\n"
            "assert 'scipy_openblas32' not in sys.modules, 'the wheel module was imported first'\n"
            "libs = {l.split()[-1] for l in open('/proc/self/maps') if 'libscipy_openblas' in l}\n"
            "print(C.__file__); print(*sorted(libs), sep='\\n')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PMSOLVE_NATIVE_LIB")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path("/").as_posix())
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split()
    assert Path(lines[0]).parent == PACKAGE
    assert len(lines) > 1 and all(Path(p).is_file() for p in lines[1:]), run.stdout  # loaded, from a real file
