// One MoE layer on the CPU, forward and backward, trained for a few steps on a regression
// task: gate GEMM -> Router::route -> DispatchPlan (capacity, drops, tile padding) -> gather
// -> per-expert Eigen FFNs -> combine, and back through all of it (Router::backward for the
// gate gradient). The layer itself is examples/common/moe_layer.hpp.
//
//   moe_layer [steps]
#include "common/moe_layer.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <moeroute/moeroute.hpp>
#include <random>

int main(int argc, char** argv) {
  using namespace moeroute;
  using Router = moeroute::Router<TopK<2>, SwitchAux>;
  using Layer = moe_example::MoeLayer<Router, float>;
  const int steps = argc > 1 ? std::atoi(argv[1]) : 200;
  const index_t T = 512, d = 32, E = 8;

  moe_example::MoeLayerConfig cfg{
      .d = 32,
      .hidden = 64,
      .router = {.num_experts = 8, .top_k = 2, .renormalize = true},
      .dispatch = {.drop = moeroute::DropPolicy::gate_weight, .capacity_factor = 1.25, .tile = 8}};
  Layer layer(cfg, {.alpha = 1e-2f});
  std::mt19937_64 rng(42);
  layer.init(rng);

  // the task: y* = tanh(x · A) for a fixed random A, on fresh inputs each step
  std::normal_distribution<float> normal;
  Layer::Mat A(d, d);
  for (Eigen::Index i = 0; i < A.size(); ++i) A.data()[i] = normal(rng) / std::sqrt(float(d));
  auto batch = [&](Layer::Mat& x, Layer::Mat& target) {
    x.resize(T, d);
    for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    target = (x * A).array().tanh().matrix();
  };

  Layer::Mat x, target, y, dy, dx;
  const float lr = 0.05f;
  for (int step = 0; step <= steps; ++step) {
    batch(x, target);
    layer.forward(x, y);
    const float loss = 0.5f * (y - target).squaredNorm() / float(T);
    dy = (y - target) / float(T);
    layer.zero_grad();
    layer.backward(dy, dx);  // the router's gradient includes the aux loss
    layer.for_each_parameter([&](Layer::Mat& p, Layer::Mat& g) { p -= lr * g; });

    if (step % 25 == 0 || step == steps) {
      const DispatchPlan& plan = layer.plan();
      std::int64_t max_load = 0;
      for (auto c : plan.counts()) max_load = std::max(max_load, c);
      const double mean = double(T * 2) / double(E);
      std::printf("step %4d  loss %.4f  aux %.4f  MaxVio %.3f  capacity %ld  dropped %5.2f%%  buffer rows %ld\n", step,
                  loss, layer.aux_loss(), (double(max_load) - mean) / mean, long(plan.capacity()),
                  100.0 * plan.dropped_fraction(), long(plan.rows()));
    }
  }

  const DispatchPlan& plan = layer.plan();
  std::printf("\nlast batch, per expert: routed / kept / segment rows (tile %ld)\n", long(cfg.dispatch.tile));
  for (index_t e = 0; e < E; ++e)
    std::printf("  expert %ld: %4ld / %4ld / %4ld\n", long(e), long(plan.counts()[std::size_t(e)]),
                long(plan.kept_counts()[std::size_t(e)]), long(plan.group_sizes()[std::size_t(e)]));
}
