# Decides whether the extension gets the CUDA backend and for which GPUs.
#
#   ROPEKV_CUDA=OFF                   (CMake option or environment) builds CPU-only
#   ROPEKV_CUDA_ARCHITECTURES="80;90" (CMake option or environment) picks the GPUs;
#   CMake's CUDAARCHS environment variable works too.
# Without a CUDA compiler the build is CPU-only and says so.
include(CheckLanguage)

if(DEFINED ENV{ROPEKV_CUDA} AND NOT DEFINED ROPEKV_CUDA)
  set(ROPEKV_CUDA "$ENV{ROPEKV_CUDA}")
endif()
option(ROPEKV_CUDA "Build the CUDA backend when a CUDA compiler is found" ON)

# CMake's CUDAARCHS environment variable is honoured too. (CMAKE_CUDA_ARCHITECTURES
# is not: enable_language() caches a default in it that looks like a choice.)
set(_ropekv_user_archs "$ENV{CUDAARCHS}")

set(ROPEKV_WITH_CUDA OFF)
if(ROPEKV_CUDA)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(ROPEKV_WITH_CUDA ON)
  else()
    message(STATUS "ropekv: no CUDA compiler found; building the CPU backend only")
  endif()
else()
  message(STATUS "ropekv: ROPEKV_CUDA=OFF; building the CPU backend only")
endif()

if(ROPEKV_WITH_CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  if(DEFINED ENV{ROPEKV_CUDA_ARCHITECTURES} AND NOT DEFINED ROPEKV_CUDA_ARCHITECTURES)
    set(ROPEKV_CUDA_ARCHITECTURES "$ENV{ROPEKV_CUDA_ARCHITECTURES}")
  endif()
  if(NOT ROPEKV_CUDA_ARCHITECTURES AND _ropekv_user_archs)
    set(ROPEKV_CUDA_ARCHITECTURES "${_ropekv_user_archs}")
  endif()
  if(NOT ROPEKV_CUDA_ARCHITECTURES)
    # Ampere, Ada, Hopper as machine code; with CUDA 12.8+ also Blackwell;
    # PTX of the newest so later GPUs can still run it. No sm_86 entry: those
    # GPUs run the sm_80 code, and each entry costs about 4 minutes of compile
    # on one core (docs/building.md, "The default list").
    set(ROPEKV_CUDA_ARCHITECTURES "80-real;89-real;90-real")
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
      list(APPEND ROPEKV_CUDA_ARCHITECTURES "100-real;120-real;120-virtual")
    else()
      list(APPEND ROPEKV_CUDA_ARCHITECTURES "90-virtual")
    endif()
  endif()
  message(STATUS "ropekv: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${ROPEKV_CUDA_ARCHITECTURES}")
endif()
