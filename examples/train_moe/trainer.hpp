// train_moe — one training run (one balancing policy) and its evaluation.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <moeroute/metrics.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "data.hpp"
#include "model.hpp"
#include "policies.hpp"
#include "specialisation.hpp"

namespace train_moe {

/// Settings of a training run.
struct TrainOptions {
  ModelConfig model;
  Hyper hyper;
  int steps = 1500;            ///< optimizer steps
  int batch = 256;             ///< tokens per step
  float lr = 3e-3f;            ///< peak learning rate (linear warm-up, cosine decay to lr/10)
  float weight_decay = 0.01f;  ///< AdamW's decoupled weight decay (matrices only)
  int eval_per_domain = 2048;  ///< held-out tokens per domain (and as many training tokens)
  int log_every = 50;          ///< progress-line period (0: silent)
  std::uint64_t seed = 1234;   ///< model initialisation and batch order (identical for every policy)
};

/// What one training step measured, averaged over the MoE layers.
struct StepLog {
  int step = 0;
  double loss = 0, aux = 0, maxvio = 0, gini = 0, entropy = 0, dropped = 0, lr = 0;
  double soft_maxvio = 0;  ///< MaxVio of the soft loads Σ_t p_{t,e} (hard counts: maxvio)
};

/// Evaluation of a model on a set of examples (evaluation mode: no aux loss, no update).
struct EvalResult {
  double loss = 0;            ///< mean cross-entropy, nats per byte
  double maxvio = 0;          ///< global MaxVio of the loads accumulated over the whole set, mean over layers
  double entropy = 0;         ///< normalised entropy of those loads, mean over layers
  double dropped = 0;         ///< fraction of assignments over capacity
  double specialisation = 0;  ///< I(domain; expert) / H(domain), mean over layers
  std::vector<std::vector<std::int64_t>> loads;       ///< [layer][expert] assignments
  std::vector<std::vector<double>> domain_top_share;  ///< [layer][domain] share of the domain's top expert
};

/// Everything a run reports.
struct RunResult {
  std::string name;    ///< run name (policy, plus @decay in a sweep)
  std::string policy;  ///< policy name
  float decay = 0;
  std::vector<StepLog> log;
  EvalResult train, held_out;
  double gini_training = 0;         ///< mean over steps of the batch Gini
  double maxvio_training = 0;       ///< mean over steps of the batch MaxVio
  double soft_maxvio_training = 0;  ///< mean over steps of the batch MaxVio of the soft loads
  double dropped_training = 0;      ///< mean over steps of the dropped fraction
  double similarity = 0;  ///< mean |cos| between the experts' router directions (columns of W_r), mean over layers
  double seconds = 0;
};

/// Evaluates `model` on `data` in batches of `batch` tokens.
template <class RouterT>
EvalResult evaluate(Model<RouterT>& model, const Batch& data, int batch, int domains) {
  const ModelConfig& c = model.config();
  EvalResult r;
  r.loads.assign(std::size_t(c.layers), std::vector<std::int64_t>(std::size_t(c.experts), 0));
  std::vector<std::vector<double>> joint(std::size_t(c.layers),
                                         std::vector<double>(std::size_t(domains * c.experts), 0.0));
  model.set_training(false);
  double loss = 0, dropped = 0, assignments = 0;
  const int n = data.size();
  for (int start = 0; start < n; start += batch) {
    const int T = std::min(batch, n - start);
    Batch b;
    b.context_length = data.context_length;
    b.context.assign(data.context.begin() + std::ptrdiff_t(start) * data.context_length,
                     data.context.begin() + std::ptrdiff_t(start + T) * data.context_length);
    b.target.assign(data.target.begin() + start, data.target.begin() + start + T);
    b.domain.assign(data.domain.begin() + start, data.domain.begin() + start + T);
    loss += model.forward(b) * T;
    for (int l = 0; l < c.layers; ++l) {
      const LayerStats& s = model.stats()[std::size_t(l)];
      dropped += double(s.dropped);
      assignments += double(s.assignments);
      model.layers()[std::size_t(l)]->for_each_assignment([&](int t, int e) {
        ++r.loads[std::size_t(l)][std::size_t(e)];
        ++joint[std::size_t(l)][std::size_t(b.domain[std::size_t(t)] * c.experts + e)];
      });
    }
  }
  model.set_training(true);
  r.loss = n > 0 ? loss / n : 0.0;
  r.dropped = assignments > 0 ? dropped / assignments : 0.0;
  for (int l = 0; l < c.layers; ++l) {
    const moeroute::LoadStats st = moeroute::load_stats(r.loads[std::size_t(l)]);
    r.maxvio += st.max_vio / c.layers;
    r.entropy += st.entropy / c.layers;
    r.specialisation += domain_expert_information(joint[std::size_t(l)], domains, c.experts) / c.layers;
    std::vector<double> share(std::size_t(domains), 0.0);
    for (int d = 0; d < domains; ++d) {
      double total = 0, top = 0;
      for (int e = 0; e < c.experts; ++e) {
        const double x = joint[std::size_t(l)][std::size_t(d * c.experts + e)];
        total += x;
        top = std::max(top, x);
      }
      share[std::size_t(d)] = total > 0 ? top / total : 0.0;
    }
    r.domain_top_share.push_back(share);
  }
  return r;
}

/// Learning rate at `step` (0-based): linear warm-up over the first 5 % of the steps, then
/// cosine decay to a tenth of the peak.
inline float learning_rate(const TrainOptions& o, int step) {
  const int warm = std::max(1, o.steps / 20);
  if (step < warm) return o.lr * float(step + 1) / float(warm);
  const double p = double(step - warm) / double(std::max(1, o.steps - warm));
  return float(o.lr * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * p))));
}

/// Trains a fresh model under `Policy` and evaluates it. `progress` receives one line per
/// `log_every` steps (may be empty).
template <class Policy>
RunResult train_run(const Corpus& corpus, const TrainOptions& o, const std::string& run_name,
                    const std::function<void(const std::string&)>& progress) {
  using RouterT = moeroute::Router<typename Policy::selection, typename Policy::balancer, moeroute::ReferenceBackend,
                                   typename Policy::scoring>;
  const auto t0 = std::chrono::steady_clock::now();
  RunResult res;
  res.name = run_name;
  res.policy = Policy::name;
  res.decay = Policy::uses_decay ? o.hyper.decay : 0.0f;

  Model<RouterT> model(o.model, Policy::config(o.hyper), o.seed);
  AdamW opt;
  opt.weight_decay = o.weight_decay;
  std::mt19937_64 rng(o.seed ^ 0x9e3779b97f4a7c15ULL);
  const int L = o.model.layers;
  for (int step = 0; step < o.steps; ++step) {
    const Batch b = corpus.train_batch(o.batch, o.model.context, rng);
    model.zero_grad();
    StepLog s;
    s.step = step + 1;
    s.loss = model.forward(b);
    model.backward(b);
    s.lr = learning_rate(o, step);
    opt.step(model.params(), float(s.lr));
    for (auto& layer : model.layers()) layer->router().step();
    for (const LayerStats& ls : model.stats()) {
      const moeroute::LoadStats st = moeroute::load_stats(ls.counts);
      s.aux += ls.aux_loss;
      s.maxvio += st.max_vio / L;
      s.soft_maxvio += ls.soft_max_vio / L;
      s.gini += st.gini / L;
      s.entropy += st.entropy / L;
      s.dropped += double(ls.dropped) / double(std::max<std::int64_t>(1, ls.assignments)) / L;
    }
    if (!std::isfinite(s.loss))
      throw std::runtime_error(run_name + ": the loss diverged at step " + std::to_string(step + 1));
    res.log.push_back(s);
    if (progress && o.log_every > 0 && ((step + 1) % o.log_every == 0 || step + 1 == o.steps)) {
      // mean over the last period, so the line is not one noisy batch
      const int from = std::max(0, int(res.log.size()) - o.log_every);
      double loss = 0, mv = 0;
      for (int i = from; i < int(res.log.size()); ++i)
        loss += res.log[std::size_t(i)].loss, mv += res.log[std::size_t(i)].maxvio;
      const double n = double(int(res.log.size()) - from);
      char line[256];
      std::snprintf(line, sizeof line, "[%-16s] step %5d/%d  loss %.4f  MaxVio %.3f  (%.0f s)", run_name.c_str(),
                    step + 1, o.steps, loss / n, mv / n,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      progress(line);
    }
  }
  for (const StepLog& s : res.log) {
    res.gini_training += s.gini / double(res.log.size());
    res.maxvio_training += s.maxvio / double(res.log.size());
    res.soft_maxvio_training += s.soft_maxvio / double(res.log.size());
    res.dropped_training += s.dropped / double(res.log.size());
  }
  for (auto& layer : model.layers())
    res.similarity +=
        moeroute::expert_similarity(moeroute::MatrixView<const float>(layer->wr.w.data(), o.model.d, o.model.experts))
            .mean_abs_cosine /
        L;
  // the same number of examples from the training split, at fixed positions
  std::mt19937_64 eval_rng(o.seed + 7);
  const Batch train_sample = corpus.train_batch(o.eval_per_domain * corpus.num_domains(), o.model.context, eval_rng);
  res.train = evaluate(model, train_sample, o.batch, corpus.num_domains());
  res.held_out = evaluate(model, corpus.held_out(o.eval_per_domain, o.model.context), o.batch, corpus.num_domains());
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

/// Trains under the policy called `policy`; throws std::invalid_argument for an unknown name.
inline RunResult train_named(const std::string& policy, const Corpus& corpus, const TrainOptions& o,
                             const std::string& run_name, const std::function<void(const std::string&)>& progress) {
  RunResult r;
  if (!with_policy(policy, [&](auto p) { r = train_run<decltype(p)>(corpus, o, run_name, progress); }))
    throw std::invalid_argument("--policies: unknown policy '" + policy + "'");
  return r;
}

}  // namespace train_moe
