# Consumer-project test: install moeroute to a scratch prefix, build tests/consumer (an
# out-of-tree project using find_package(moeroute CONFIG REQUIRED)) against it, run it.
add_test(NAME test_consumer
         COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/consumer
                 -DCXX=${CMAKE_CXX_COMPILER} -DGENERATOR=${CMAKE_GENERATOR} -P
                 ${CMAKE_CURRENT_SOURCE_DIR}/consumer/run.cmake)
set_tests_properties(test_consumer PROPERTIES TIMEOUT 300)
