# Backward of every scoring mode against PyTorch autograd (libtorch, double tensors): built
# only where libtorch is found (Debian: libtorch-dev).
find_package(Torch QUIET)
if(Torch_FOUND)
  moeroute_add_test(test_torch_autograd ${CMAKE_CURRENT_SOURCE_DIR}/test_torch_autograd.cpp LIBS ${TORCH_LIBRARIES})
else()
  message(STATUS "moeroute: libtorch not found; test_torch_autograd is not built")
endif()
