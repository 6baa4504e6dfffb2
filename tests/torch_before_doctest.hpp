// libtorch for tests that also use doctest. Include it before <doctest/doctest.h>: libtorch's
// logging (c10) defines glog-style CHECK* macros of its own, which are dropped here so that
// doctest's take their names.
#pragma once

#include <torch/torch.h>
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LE
#undef CHECK_LT
#undef CHECK_GE
#undef CHECK_GT
