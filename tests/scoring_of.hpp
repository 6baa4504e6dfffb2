// Maps a library scoring policy to the matching scoring mode of the independent fp64 router
// in naive_router.hpp, for tests that run both on the same policy.
#pragma once

#include <moeroute/scoring.hpp>
#include <type_traits>

#include "naive_router.hpp"

namespace naive {

/// The naive scoring mode of the library policy `Sc` (SoftmaxOverSelected for any other).
template <class Sc>
constexpr Scoring scoring_of() {
  if constexpr (std::is_same_v<Sc, moeroute::Softmax>)
    return Scoring::softmax;
  else if constexpr (std::is_same_v<Sc, moeroute::Sigmoid>)
    return Scoring::sigmoid;
  else if constexpr (std::is_same_v<Sc, moeroute::SqrtSoftplus>)
    return Scoring::sqrt_softplus;
  else
    return Scoring::softmax_selected;
}

}  // namespace naive
