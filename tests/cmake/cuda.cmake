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
