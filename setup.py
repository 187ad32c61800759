"""Builds the native core pmsolve._C with CMake.

BLAS/LAPACK come from the PyPI package scipy-openblas32 (docs/design.md §5):
no system BLAS is needed and the library is the same on every machine.
Set PMSOLVE_CUDA=1 to also compile the CUDA backend (needs nvcc and the
nvidia-cublas / nvidia-cusolver wheels).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
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
