# SqrtSoftplus tests; where libtorch is found they also compare the backward with PyTorch
# autograd (MOEROUTE_HAVE_TORCH), otherwise they run without that comparison.
find_package(Torch QUIET)
if(Torch_FOUND)
  moeroute_add_test(test_sqrt_softplus ${CMAKE_CURRENT_SOURCE_DIR}/test_sqrt_softplus.cpp LIBS ${TORCH_LIBRARIES})
  target_compile_definitions(test_sqrt_softplus PRIVATE MOEROUTE_HAVE_TORCH=1)
else()
  moeroute_add_test(test_sqrt_softplus ${CMAKE_CURRENT_SOURCE_DIR}/test_sqrt_softplus.cpp)
  message(STATUS "moeroute: libtorch not found; test_sqrt_softplus runs without the PyTorch autograd comparison")
endif()
