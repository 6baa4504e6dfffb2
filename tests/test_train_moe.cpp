// The training example end to end on a tiny configuration: the model's backward against finite
// differences, training lowers the loss, and balancing lowers MaxVio against no balancing.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "../examples/train_moe/trainer.hpp"

namespace {

using namespace train_moe;

// Three synthetic domains with different statistics: words, arithmetic, C-like statements.
Corpus synthetic_corpus(std::size_t bytes_per_domain) {
  std::mt19937 rng(7);
  auto pick = [&](std::size_t n) { return std::size_t(rng() % n); };
  const char* words[] = {"the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "of", "red"};
  const char* names[] = {"x", "y", "count", "buf", "i", "len"};
  const char* types[] = {"int", "char*", "size_t", "float"};
  Domain prose{"prose", {}, 1}, math{"math", {}, 1}, code{"code", {}, 1};
  while (prose.text.size() < bytes_per_domain) {
    prose.text += words[pick(13)];
    prose.text += pick(8) == 0 ? ".\n" : " ";
  }
  while (math.text.size() < bytes_per_domain) {
    const int a = int(pick(100)), b = int(pick(100));
    math.text += std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b) + ";";
  }
  while (code.text.size() < bytes_per_domain) {
    code.text += std::string(types[pick(4)]) + " " + names[pick(6)] + " = " + names[pick(6)] + ";\n";
  }
  return Corpus({prose, math, code});
}

TrainOptions tiny_options() {
  TrainOptions o;
  o.model.d = 32;
  o.model.hidden = 32;
  o.model.experts = 8;
  o.model.top_k = 2;
  o.model.layers = 2;
  o.model.context = 4;
  o.steps = 200;
  o.batch = 96;
  o.eval_per_domain = 256;
  o.log_every = 0;
  return o;
}

}  // namespace

using TopKRouter = moeroute::Router<moeroute::TopK<moeroute::runtime_k>, moeroute::NoBalancing>;
using ExpertChoiceRouter = moeroute::Router<moeroute::ExpertChoice, moeroute::NoBalancing>;

TEST_CASE_TEMPLATE("train_moe: the model's backward matches central finite differences of the loss", R, TopKRouter,
                   ExpertChoiceRouter) {
  const Corpus corpus = synthetic_corpus(4000);
  ModelConfig mc = tiny_options().model;
  mc.capacity_factor = 8.0f;  // no drops: a perturbation must not change which assignments are kept
  Model<R> model(mc, {}, 5);
  std::mt19937_64 rng(3);
  const Batch b = corpus.train_batch(24, mc.context, rng);
  model.zero_grad();
  model.forward(b);
  auto all_ids = [&] {
    std::vector<std::int32_t> v;
    for (auto& l : model.layers()) v.insert(v.end(), l->routing().ids.begin(), l->routing().ids.end());
    return v;
  };
  const std::vector<std::int32_t> ids0 = all_ids();
  model.backward(b);

  // every parameter tensor: the embeddings, router weights, expert weights and biases, output
  int checked = 0, skipped = 0;
  std::mt19937 pick(11);
  for (Param* p : model.params()) {
    for (int trial = 0; trial < 2; ++trial) {
      const Eigen::Index i = Eigen::Index(pick() % std::uint32_t(p->w.size()));
      const float w0 = p->w.data()[i];
      const float h = 1e-2f;
      p->w.data()[i] = w0 + h;
      const double lp = model.forward(b);
      bool same_routing = all_ids() == ids0;
      p->w.data()[i] = w0 - h;
      const double lm = model.forward(b);
      same_routing = same_routing && all_ids() == ids0;
      p->w.data()[i] = w0;
      if (!same_routing) {
        ++skipped;  // top-k switched: the loss is not differentiable across that step
        continue;
      }
      const double fd = (lp - lm) / (2.0 * h);
      const double an = p->g.data()[i];
      CHECK(std::abs(fd - an) <= 2e-3 + 0.03 * std::abs(fd));
      ++checked;
    }
  }
  MESSAGE("finite-difference checks: " << checked << " entries (" << skipped << " skipped: routing changed)");
  CHECK(checked >= int(model.params().size()));
}

TEST_CASE("train_moe: training lowers the loss, and balancing lowers MaxVio against no balancing") {
  const Corpus corpus = synthetic_corpus(30000);
  const TrainOptions o = tiny_options();
  const RunResult none = train_run<PolicyNone>(corpus, o, "none", {});
  const RunResult lossfree = train_run<PolicyLossFree>(corpus, o, "lossfree", {});
  const RunResult phi = train_run<PolicyPhiEntropy>(corpus, o, "phi-entropy", {});
  const RunResult sw = train_run<PolicySwitch>(corpus, o, "switch", {});
  // the aux-loss policies at a strong α, so their gradient path through the model is what moves the load
  TrainOptions strong = o;
  strong.hyper.alpha = 0.1f;
  const RunResult phi_strong = train_run<PolicyPhiEntropy>(corpus, strong, "phi-entropy a=0.1", {});
  const RunResult sw_strong = train_run<PolicySwitch>(corpus, strong, "switch a=0.1", {});
  for (const RunResult* r : {&none, &lossfree, &phi, &sw, &phi_strong, &sw_strong})
    MESSAGE(r->name << ": first-step loss " << r->log.front().loss << ", held-out loss " << r->held_out.loss
                    << ", held-out global MaxVio " << r->held_out.maxvio << ", mean batch MaxVio "
                    << r->maxvio_training);

  // Uniform prediction costs log 256 = 5.55 nats per byte; the synthetic text is far more
  // predictable than that.
  const double uniform = std::log(256.0);
  CHECK(none.log.front().loss > 0.95 * uniform);
  for (const RunResult* r : {&none, &lossfree, &phi, &sw}) {
    CHECK(r->held_out.loss < 0.5 * uniform);
    CHECK(r->train.loss < 0.5 * uniform);
  }
  // Balancing: lower imbalance on the held-out set and over training (clear margins only; at
  // α = 1e-2 the aux losses move the load too little in 200 steps for a robust assertion).
  CHECK(lossfree.held_out.maxvio < 0.8 * none.held_out.maxvio);
  CHECK(lossfree.maxvio_training < 0.8 * none.maxvio_training);
  CHECK(phi_strong.maxvio_training < 0.8 * none.maxvio_training);
  CHECK(sw_strong.maxvio_training < 0.8 * none.maxvio_training);
}

TEST_CASE("train_moe: unknown policy names and bad corpora are clear errors") {
  const Corpus corpus = synthetic_corpus(2000);
  CHECK_THROWS_AS(train_named("no-such-policy", corpus, tiny_options(), "x", {}), std::invalid_argument);
  CHECK_THROWS_AS(Corpus({Domain{"short", "abc", 1}}), std::invalid_argument);
  CHECK_THROWS_AS(Corpus(std::vector<Domain>{}), std::invalid_argument);
  CHECK(policy_uses_decay("phi-entropy"));
  CHECK_FALSE(policy_uses_decay("switch"));
}
