# bench_cpu: CpuBackend against libtorch (when found), a naive router and the memory floor.
# Built for the build machine (-march=native); run: <build>/bench/bench_cpu [--full].
find_package(Threads REQUIRED)
add_executable(bench_cpu ${CMAKE_CURRENT_SOURCE_DIR}/bench_cpu.cpp)
target_link_libraries(bench_cpu PRIVATE moeroute::moeroute moeroute_dev_flags Threads::Threads)
target_compile_options(bench_cpu PRIVATE -march=native -ffp-contract=off)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12 warns falsely inside its own AVX-512 intrinsic headers
  target_compile_options(bench_cpu PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
endif()
find_package(Torch QUIET CONFIG PATHS /usr/lib/x86_64-linux-gnu/cmake/Torch)
if(Torch_FOUND)
  target_link_libraries(bench_cpu PRIVATE ${TORCH_LIBRARIES})
  target_compile_definitions(bench_cpu PRIVATE MOEROUTE_BENCH_TORCH=1)
  message(STATUS "moeroute: bench_cpu compares against libtorch ${Torch_VERSION}")
else()
  message(STATUS "moeroute: libtorch not found; bench_cpu runs without the libtorch comparison")
endif()
