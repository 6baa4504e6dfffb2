# Distributed statistics over MPI (two ranks). Built and registered only when MPI is found.
find_package(MPI COMPONENTS CXX QUIET)
if(MPI_CXX_FOUND AND MPIEXEC_EXECUTABLE)
  add_executable(test_mpi_stats ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_mpi_stats.cpp)
  # own main (MPI_Init/MPI_Finalize around doctest), so not moeroute_test_main
  target_link_libraries(test_mpi_stats PRIVATE doctest::doctest moeroute::moeroute moeroute_dev_flags MPI::MPI_CXX)
  set(_moeroute_mpi_flags ${MPIEXEC_NUMPROC_FLAG} 2)
  # OpenMPI refuses to start more ranks than cores, and refuses to run as root, unless told
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _moeroute_mpi_version ERROR_QUIET)
  if(_moeroute_mpi_version MATCHES "Open MPI|OpenRTE")
    list(APPEND _moeroute_mpi_flags --oversubscribe)
    execute_process(COMMAND id -u OUTPUT_VARIABLE _moeroute_uid OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_moeroute_uid STREQUAL "0")
      list(APPEND _moeroute_mpi_flags --allow-run-as-root)
    endif()
  endif()
  add_test(NAME test_mpi_stats
           COMMAND ${MPIEXEC_EXECUTABLE} ${_moeroute_mpi_flags} ${MPIEXEC_PREFLAGS} $<TARGET_FILE:test_mpi_stats>
                   ${MPIEXEC_POSTFLAGS})
  set_tests_properties(test_mpi_stats PROPERTIES TIMEOUT 120
                       ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
else()
  message(STATUS "moeroute: MPI not found; test_mpi_stats is not built")
endif()
