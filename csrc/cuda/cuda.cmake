# CUDA backend, included from CMakeLists.txt when -DPMSOLVE_CUDA=ON.
#
# The compiler and the CUDA runtime are nvcc's own; cuBLAS and cuSOLVER come
# from the PyPI wheels nvidia-cublas / nvidia-cusolver, which install under
# site-packages/nvidia/cu13/{include,lib} (the same files CUDA builds of torch
# load). -DPMSOLVE_CUDA_LIB_ROOT=<.../nvidia/cu13>, or the environment variable
# of that name (which reaches pip's isolated builds through setup.py), overrides
# where they are.

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # Machine code for A100 (sm_80) and H100/H200 (sm_90), plus sm_90 PTX for newer GPUs to JIT.
  set(CMAKE_CUDA_ARCHITECTURES 80-real 90)
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

if(NOT PMSOLVE_CUDA_LIB_ROOT AND DEFINED ENV{PMSOLVE_CUDA_LIB_ROOT})
  set(PMSOLVE_CUDA_LIB_ROOT $ENV{PMSOLVE_CUDA_LIB_ROOT})
endif()
if(NOT PMSOLVE_CUDA_LIB_ROOT)
  # nvidia is a namespace package: search every folder it spans.
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "
import importlib.util, os
spec = importlib.util.find_spec('nvidia')
roots = [os.path.join(p, 'cu13') for p in (spec.submodule_search_locations if spec else [])]
hits = [r for r in roots if all(os.path.isfile(os.path.join(r, 'include', h)) for h in ('cublas_v2.h', 'cusolverDn.h'))]
print(hits[0] if hits else '', end='')"
    OUTPUT_VARIABLE PMSOLVE_CUDA_LIB_ROOT)
endif()
if(NOT PMSOLVE_CUDA_LIB_ROOT)
  message(FATAL_ERROR
    "PMSOLVE_CUDA=ON, but ${Python_EXECUTABLE} sees no nvidia/cu13 folder holding both the cuBLAS and the "
    "cuSOLVER headers: pip install nvidia-cublas nvidia-cusolver (or see tools/build_cuda.sh), "
    "or pass -DPMSOLVE_CUDA_LIB_ROOT=<folder with include/ and lib/>")
endif()
message(STATUS "pmsolve CUDA backend: cuBLAS/cuSOLVER from ${PMSOLVE_CUDA_LIB_ROOT}")

# The wheels ship only versioned sonames (libcublas.so.13), hence the explicit names.
find_library(PMSOLVE_CUBLAS_LIBRARY NAMES cublas libcublas.so.13
             PATHS ${PMSOLVE_CUDA_LIB_ROOT} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH REQUIRED)
find_library(PMSOLVE_CUSOLVER_LIBRARY NAMES cusolver libcusolver.so.12
             PATHS ${PMSOLVE_CUDA_LIB_ROOT} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH REQUIRED)

# Only these four headers are taken from the wheels' include folder: it may also
# hold another CUDA release's runtime headers (nvidia-cuda-runtime), which must
# not shadow nvcc's own.
set(PMSOLVE_CUDA_INCLUDE ${CMAKE_CURRENT_BINARY_DIR}/pmsolve_cuda_include)
file(MAKE_DIRECTORY ${PMSOLVE_CUDA_INCLUDE})
foreach(header cublas_v2.h cublas_api.h cusolverDn.h cusolver_common.h)
  file(CREATE_LINK ${PMSOLVE_CUDA_LIB_ROOT}/include/${header} ${PMSOLVE_CUDA_INCLUDE}/${header} SYMBOLIC)
endforeach()

# The CUDA source is an object library of its own so that _C's host-compiler
# warning flags (-Wall, which nvcc rejects) do not reach nvcc.
add_library(pmsolve_cuda OBJECT ${CMAKE_CURRENT_LIST_DIR}/pm_cuda.cu)
target_include_directories(pmsolve_cuda PRIVATE ${CMAKE_CURRENT_LIST_DIR} ${PMSOLVE_CUDA_INCLUDE})
set_target_properties(pmsolve_cuda PROPERTIES
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden)
target_compile_options(pmsolve_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall --Werror=all-warnings>)

target_sources(_C PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bindings_cuda.cpp)
target_include_directories(_C PRIVATE ${CMAKE_CURRENT_LIST_DIR})
target_compile_definitions(_C PRIVATE PMSOLVE_WITH_CUDA)
# The CUDA runtime is linked statically: importing _C then needs no libcudart
# from anywhere, and it still shares the driver's primary context with torch,
# so torch's device pointers and streams are valid here.
target_link_libraries(_C PRIVATE pmsolve_cuda ${PMSOLVE_CUBLAS_LIBRARY} ${PMSOLVE_CUSOLVER_LIBRARY} CUDA::cudart_static)
# Installed, pmsolve/ and nvidia/ are siblings in site-packages; the absolute
# path serves builds used in place.
get_filename_component(PMSOLVE_CUDA_LIB_DIR ${PMSOLVE_CUBLAS_LIBRARY} DIRECTORY)
set_property(TARGET _C APPEND PROPERTY INSTALL_RPATH "$ORIGIN/../nvidia/cu13/lib" "${PMSOLVE_CUDA_LIB_DIR}")
