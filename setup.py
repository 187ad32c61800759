"""Builds the native core pmsolve._C with CMake.

BLAS/LAPACK come from the PyPI package scipy-openblas32 (docs/design.md §5):
no system BLAS is needed and the library is the same on every machine.
Set PMSOLVE_CUDA=1 to also compile the CUDA backend (needs nvcc and the
nvidia-cublas / nvidia-cusolver wheels).
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def openblas_rpath(dest: Path) -> list[str]:
    """Where the built extension looks for libscipy_openblas.so, so that ``import pmsolve._C``
    works on its own (without pmsolve/_native.py loading the library first).

    The build runs in pip's isolated environment, whose scipy_openblas32 is deleted afterwards:
    its folder is no use at run time. The library the extension will load is the one of the
    environment pmsolve is installed into (``sysconfig``'s platlib/purelib: the running
    interpreter's prefix, also under build isolation). In order:
    - ``$ORIGIN/../scipy_openblas32/lib``: a regular install (pmsolve/ beside scipy_openblas32/);
    - the same folder relative to ``$ORIGIN`` when the extension lives in the source tree
      (``dest``: an editable or in-place build): it survives moving the checkout together with
      its virtual environment;
    - that folder as an absolute path.
    """
    paths = ["$ORIGIN/../scipy_openblas32/lib"]
    for key in ("platlib", "purelib"):
        lib = Path(sysconfig.get_path(key)) / "scipy_openblas32" / "lib"
        if dest.is_relative_to(ROOT):
            paths.append("$ORIGIN/" + os.path.relpath(lib, dest))
        paths.append(str(lib))
    return list(dict.fromkeys(paths))


class CMakeBuild(build_ext):
    def _final_dir(self, out_dir: Path) -> Path:
        """Where the extension will live: an editable install builds it elsewhere and then
        copies it into the source package."""
        if getattr(self, "editable_mode", False) or self.inplace:
            return ROOT / "pmsolve"
        return out_dir

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import scipy_openblas32

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("PMSOLVE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DOPENBLAS_INCLUDE_DIR={scipy_openblas32.get_include_dir()}",
            f"-DOPENBLAS_LIB_DIR={scipy_openblas32.get_lib_dir()}",
            f"-DOPENBLAS_LIB_NAME={scipy_openblas32.get_library()}",
            f"-DPMSOLVE_OPENBLAS_RPATH={';'.join(openblas_rpath(self._final_dir(out_dir)))}",
            f"-DPMSOLVE_CUDA={'ON' if os.environ.get('PMSOLVE_CUDA') == '1' else 'OFF'}",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("pmsolve._C")], cmdclass={"build_ext": CMakeBuild})
