# Installs moeroute from SOURCE_DIR into a fresh prefix under WORK_DIR, then configures,
# builds and runs the out-of-tree consumer project against that prefix only.
#   cmake -DSOURCE_DIR=<moeroute source> -DWORK_DIR=<scratch dir> [-DCXX=<compiler>]
#         [-DGENERATOR=<generator>] -P run.cmake
cmake_minimum_required(VERSION 3.20)
foreach(var SOURCE_DIR WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "run.cmake: set -D${var}=...")
  endif()
endforeach()
set(prefix ${WORK_DIR}/prefix)
set(common_args)
if(CXX)
  list(APPEND common_args -DCMAKE_CXX_COMPILER=${CXX})
endif()
if(GENERATOR)
  list(APPEND common_args -G ${GENERATOR})
endif()

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "consumer test: `${cmd}` failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# 1. a plain install of the library: no tests, examples, benchmarks or CUDA
step(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/moeroute-build ${common_args} -DCMAKE_BUILD_TYPE=Release
     -DCMAKE_INSTALL_PREFIX=${prefix} -DMOEROUTE_BUILD_TESTS=OFF -DMOEROUTE_BUILD_EXAMPLES=OFF
     -DMOEROUTE_BUILD_BENCHMARKS=OFF -DMOEROUTE_ENABLE_CUDA=OFF)
step(${CMAKE_COMMAND} --install ${WORK_DIR}/moeroute-build)
file(GLOB_RECURSE config_files ${prefix}/*moerouteConfig.cmake)
if(NOT config_files)
  message(FATAL_ERROR "consumer test: no moerouteConfig.cmake under ${prefix}")
endif()

# 2. the consumer, finding moeroute only through the prefix (the source tree is not on any path)
step(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${WORK_DIR}/consumer-build ${common_args}
     -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(NOT step_output MATCHES "from ${prefix}/")
  message(FATAL_ERROR "consumer test: moeroute was not found in ${prefix}:\n${step_output}")
endif()
step(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer-build)

# 3. run it
step(${WORK_DIR}/consumer-build/app)
message(STATUS "${step_output}")
