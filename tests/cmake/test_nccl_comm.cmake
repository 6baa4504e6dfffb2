# NcclComm test: built only where the CUDA runtime and NCCL (nccl.h, libnccl) are found. It is
# host code (no CUDA compiler needed) and skips its cases at run time without enough GPUs.
# MOEROUTE_ENABLE_CUDA=OFF turns it off with the rest of the CUDA parts.
if(MOEROUTE_ENABLE_CUDA)
  find_package(CUDAToolkit QUIET)
endif()
find_package(Threads REQUIRED)
if(CUDAToolkit_FOUND)
  find_path(MOEROUTE_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_HOME PATH_SUFFIXES include)
  find_library(MOEROUTE_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} ENV NCCL_HOME PATH_SUFFIXES lib lib64)
endif()
if(CUDAToolkit_FOUND AND MOEROUTE_NCCL_INCLUDE_DIR AND MOEROUTE_NCCL_LIBRARY)
  moeroute_add_test(test_nccl_comm ${CMAKE_CURRENT_SOURCE_DIR}/test_nccl_comm.cpp
                    LIBS CUDA::cudart ${MOEROUTE_NCCL_LIBRARY} Threads::Threads)
  target_include_directories(test_nccl_comm PRIVATE ${MOEROUTE_NCCL_INCLUDE_DIR})
else()
  message(STATUS "moeroute: CUDA runtime or NCCL not found; test_nccl_comm is not built")
endif()
