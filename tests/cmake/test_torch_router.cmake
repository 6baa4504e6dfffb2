# libtorch integration test: built only where libtorch is found.
find_package(Torch QUIET)
if(Torch_FOUND)
  moeroute_add_test(test_torch_router ${CMAKE_CURRENT_SOURCE_DIR}/test_torch_router.cpp LIBS ${TORCH_LIBRARIES})
  target_include_directories(test_torch_router PRIVATE ${PROJECT_SOURCE_DIR}/examples/torch_router)
else()
  message(STATUS "moeroute: libtorch not found; test_torch_router is not built")
endif()
