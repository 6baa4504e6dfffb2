# The README quickstart (examples/quickstart.cpp) compiled as printed and run as a test, and
# the snippets of README.md (Router API) (test_quickstart.cpp) as doctest cases.
add_executable(test_quickstart_example ${PROJECT_SOURCE_DIR}/examples/quickstart.cpp)
target_link_libraries(test_quickstart_example PRIVATE moeroute::moeroute moeroute_dev_flags Eigen3::Eigen)
add_test(NAME test_quickstart_example COMMAND test_quickstart_example)
moeroute_add_test(test_quickstart ${CMAKE_CURRENT_SOURCE_DIR}/test_quickstart.cpp)
