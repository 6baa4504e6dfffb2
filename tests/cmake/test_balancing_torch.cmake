# Balancers' full backward (task gradient + aux losses) against PyTorch autograd; built only
# where libtorch is found.
find_package(Torch QUIET)
if(Torch_FOUND)
  moeroute_add_test(test_balancing_torch ${CMAKE_CURRENT_SOURCE_DIR}/test_balancing_torch.cpp LIBS ${TORCH_LIBRARIES})
else()
  message(STATUS "moeroute: libtorch not found; test_balancing_torch is not built")
endif()
