# CpuBackend equivalence tests, built once per instruction-set path the build machine can run:
# the portable build (scalar path), AVX2 + FMA, and -march=native (AVX-512 where present).
include(CheckCXXSourceRuns)
include(CMakePushCheckState)
find_package(Threads REQUIRED)

moeroute_add_test(test_cpu_backend ${CMAKE_CURRENT_SOURCE_DIR}/test_cpu_backend.cpp LIBS Threads::Threads)

# a variant is added only when the compiler accepts the flags and this machine runs the code
function(moeroute_cpu_test_variant suffix)
  cmake_push_check_state(RESET)
  set(CMAKE_REQUIRED_FLAGS "${ARGN}")
  string(REPLACE ";" " " CMAKE_REQUIRED_FLAGS "${CMAKE_REQUIRED_FLAGS}")
  check_cxx_source_runs([=[
    #include <immintrin.h>
    int main() {
      volatile float a = 1.0f;
      __m256 x = _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_set1_ps(2.0f), _mm256_set1_ps(3.0f));
      float out[8];
      _mm256_storeu_ps(out, x);
      return out[0] == 5.0f ? 0 : 1;
    }]=] MOEROUTE_CPU_RUNS_${suffix})
  cmake_pop_check_state()
  if(MOEROUTE_CPU_RUNS_${suffix})
    moeroute_add_test(test_cpu_backend_${suffix} ${CMAKE_CURRENT_SOURCE_DIR}/test_cpu_backend.cpp LIBS Threads::Threads)
    target_compile_options(test_cpu_backend_${suffix} PRIVATE ${ARGN} -ffp-contract=off)
    # GCC 12 warns falsely inside its own AVX-512 intrinsic headers (_mm512_undefined_*)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      target_compile_options(test_cpu_backend_${suffix} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
  endif()
endfunction()
moeroute_cpu_test_variant(avx2 -mavx2 -mfma -mf16c)
moeroute_cpu_test_variant(native -march=native)
