# bench_cuda: CudaBackend on the GPU against the memory floor (compiled when nvcc exists;
# prints "skipped: no CUDA device" without a GPU). bench/torch_gpu_bench.py times the same
# work in PyTorch and prints the ratios. Run: <build>/bench/bench_cuda [--quick].
if(MOEROUTE_HAVE_CUDA)
  if(NOT DEFINED MOEROUTE_CUDA_ARCHITECTURES)
    set(MOEROUTE_CUDA_ARCHITECTURES "80;90-real" CACHE STRING
        "GPU architectures of the CUDA tests and benchmarks (80: SASS + portable PTX; 90-real: H100 SASS)")
  endif()
  add_executable(bench_cuda ${CMAKE_CURRENT_SOURCE_DIR}/cuda/bench_cuda.cu)
  set_target_properties(bench_cuda PROPERTIES CUDA_ARCHITECTURES "${MOEROUTE_CUDA_ARCHITECTURES}")
  target_link_libraries(bench_cuda PRIVATE moeroute::moeroute)
  # CMake 3.25 does not know nvcc 13's C++20 flag; given explicitly
  target_compile_options(bench_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr
                                            -Xcompiler=-Wall,-Wextra>)
endif()
