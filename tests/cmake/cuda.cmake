# CUDA backend tests: compiled with nvcc when a CUDA compiler exists; without a GPU the
# executable prints "skipped: no CUDA device" and succeeds.
if(MOEROUTE_HAVE_CUDA)
  set(MOEROUTE_CUDA_ARCHITECTURES "80;90-real" CACHE STRING
      "GPU architectures of the CUDA tests and benchmarks (80: SASS + portable PTX; 90-real: H100 SASS)")
  # CMake 3.25 does not know nvcc 13's C++20 flag (CUDA_STANDARD 20 fails), so it is given
  # explicitly. The project's host warning flags, routed to the host compiler for .cu files.
  add_library(moeroute_cuda_flags INTERFACE)
  target_compile_options(moeroute_cuda_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>
    $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -Xcompiler=-Wall,-Wextra>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${MOEROUTE_WERROR}>>:-Werror=all-warnings>)
  target_link_libraries(moeroute_cuda_flags INTERFACE moeroute::moeroute)

  add_executable(test_cuda_backend ${CMAKE_CURRENT_SOURCE_DIR}/cuda/test_cuda_backend.cu
                                   ${CMAKE_CURRENT_SOURCE_DIR}/doctest_main.cpp)
  set_target_properties(test_cuda_backend PROPERTIES CUDA_ARCHITECTURES "${MOEROUTE_CUDA_ARCHITECTURES}")
  target_link_libraries(test_cuda_backend PRIVATE moeroute_cuda_flags doctest::doctest Eigen3::Eigen)
  add_test(NAME test_cuda_backend COMMAND test_cuda_backend)
endif()

# The kernels' logic on the CPU, through a small SIMT emulator (no GPU, no nvcc needed):
# kernels.cuh is preprocessed so its shared-memory arrays become emulator storage.
find_package(Threads REQUIRED)
file(READ ${PROJECT_SOURCE_DIR}/include/moeroute/backend/cuda/kernels.cuh MOEROUTE_EMU_SRC)
string(REPLACE "#include \"../../" "#include <moeroute/" MOEROUTE_EMU_SRC "${MOEROUTE_EMU_SRC}")
string(REGEX REPLACE "#include <moeroute/([a-z_/]+\\.hpp)\"" "#include <moeroute/\\1>" MOEROUTE_EMU_SRC
       "${MOEROUTE_EMU_SRC}")
string(REGEX REPLACE "extern __shared__ ([a-z]+) ([a-z_]+)\\[\\];"
       "\\1* \\2 = reinterpret_cast<\\1*>(emu::dynamic_smem.data());" MOEROUTE_EMU_SRC "${MOEROUTE_EMU_SRC}")
# static shared variables and arrays: storage that the first thread of each block poisons
# (see the emulator)
string(REGEX REPLACE "__shared__ ([a-z ]+) ([a-z_]+)((\\[[^;]*)?);"
       "static \\1 \\2\\3; emu::shared_array(&\\2, sizeof(\\2));" MOEROUTE_EMU_SRC "${MOEROUTE_EMU_SRC}")
string(FIND "${MOEROUTE_EMU_SRC}" "__shared__" MOEROUTE_EMU_LEFT)
if(NOT MOEROUTE_EMU_LEFT EQUAL -1)
  message(FATAL_ERROR "kernels.cuh: a __shared__ declaration the emulator's preprocessing does not handle")
endif()
# one warp per reduction/scan block keeps the emulation fast (the kernels are generic in it)
string(REPLACE "reduce_threads = 128;" "reduce_threads = 32;" MOEROUTE_EMU_SRC "${MOEROUTE_EMU_SRC}")
string(REPLACE "plan_threads = 128;" "plan_threads = 32;" MOEROUTE_EMU_SRC "${MOEROUTE_EMU_SRC}")
# Writes `text` to `path`, touching the file only when it changes (no needless rebuilds).
function(moeroute_emu_write path text)
  file(WRITE ${path}.in "${text}")
  configure_file(${path}.in ${path} COPYONLY)
endfunction()
set(MOEROUTE_EMU_DIR ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu)
moeroute_emu_write(${MOEROUTE_EMU_DIR}/kernels_emu.hpp "${MOEROUTE_EMU_SRC}")

# The engine (engine.cuh, common.cuh) for the emulator too: relative includes become
# <moeroute/...>, and each kernel launch `k<<<g, b, smem, s>>>(args)` becomes
# `k | emu::Config{g, b, smem, s} | emu::args(args)` (see emulator/cuda_runtime.h).
set(MOEROUTE_EMU_CUDA ${MOEROUTE_EMU_DIR}/moeroute/backend/cuda)
moeroute_emu_write(${MOEROUTE_EMU_CUDA}/kernels.cuh "${MOEROUTE_EMU_SRC}")
foreach(header common engine)
  file(READ ${PROJECT_SOURCE_DIR}/include/moeroute/backend/cuda/${header}.cuh MOEROUTE_EMU_H)
  string(REPLACE "#include \"../../" "#include <moeroute/" MOEROUTE_EMU_H "${MOEROUTE_EMU_H}")
  string(REGEX REPLACE "#include <moeroute/([a-z_/]+\\.hpp)\"" "#include <moeroute/\\1>" MOEROUTE_EMU_H
         "${MOEROUTE_EMU_H}")
  string(REPLACE "<<<" " | emu::Config{" MOEROUTE_EMU_H "${MOEROUTE_EMU_H}")
  string(REPLACE ">>>(" "} | emu::args(" MOEROUTE_EMU_H "${MOEROUTE_EMU_H}")
  moeroute_emu_write(${MOEROUTE_EMU_CUDA}/${header}.cuh "${MOEROUTE_EMU_H}")
endforeach()
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
             ${PROJECT_SOURCE_DIR}/include/moeroute/backend/cuda/kernels.cuh
             ${PROJECT_SOURCE_DIR}/include/moeroute/backend/cuda/common.cuh
             ${PROJECT_SOURCE_DIR}/include/moeroute/backend/cuda/engine.cuh)
# The emulator's own promises (poisoned memory, schedules, launch limits).
moeroute_add_test(test_cuda_emulator ${CMAKE_CURRENT_SOURCE_DIR}/cuda/test_cuda_emulator.cpp LIBS Threads::Threads)
target_include_directories(test_cuda_emulator BEFORE PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda/emulator)

moeroute_add_test(test_kernels_emulated ${CMAKE_CURRENT_SOURCE_DIR}/cuda/test_kernels_emulated.cpp
                  LIBS Threads::Threads)
target_include_directories(test_kernels_emulated BEFORE PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda/emulator
                           ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu)
target_compile_options(test_kernels_emulated PRIVATE -Wno-unknown-pragmas -ffp-contract=off)

# The GPU test suite itself, run through the emulator against the real engine code (Router's
# device path, device-side balancing, graph capture; shapes scaled down): compiled as C++
# from a copy of test_cuda_backend.cu.
configure_file(${CMAKE_CURRENT_SOURCE_DIR}/cuda/test_cuda_backend.cu ${MOEROUTE_EMU_DIR}/test_cuda_backend.cu.cpp COPYONLY)
moeroute_add_test(test_engine_emulated ${MOEROUTE_EMU_DIR}/test_cuda_backend.cu.cpp LIBS Threads::Threads)
target_include_directories(test_engine_emulated BEFORE PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda/emulator
                           ${MOEROUTE_EMU_DIR})
target_compile_definitions(test_engine_emulated PRIVATE MOEROUTE_CUDA_EMULATED=1)
target_compile_options(test_engine_emulated PRIVATE -Wno-unknown-pragmas -ffp-contract=off)

# The emulated suites again with the threads of each scheduling round and the blocks in other
# orders (see the emulator): a result that changes with the order is a race, such as a
# missing barrier or a read of another block's output. The engine suite is the slow one, so
# its extra run is left out of the sanitizer build.
foreach(schedule reverse shuffle)
  add_test(NAME test_kernels_emulated_${schedule} COMMAND test_kernels_emulated)
  set_tests_properties(test_kernels_emulated_${schedule} PROPERTIES ENVIRONMENT
                       "MOEROUTE_EMU_SCHEDULE=${schedule};MOEROUTE_EMU_SEED=7")
endforeach()
if(NOT MOEROUTE_SANITIZE)
  add_test(NAME test_engine_emulated_shuffle COMMAND test_engine_emulated)
  set_tests_properties(test_engine_emulated_shuffle PROPERTIES ENVIRONMENT
                       "MOEROUTE_EMU_SCHEDULE=shuffle;MOEROUTE_EMU_SEED=7")
endif()
