// train_moe — the balancing policies the experiment compares: a compile-time list of types,
// each selected by its name at run time.
#pragma once

#include <moeroute/balancing/compose.hpp>
#include <moeroute/balancing/loss_free.hpp>
#include <moeroute/balancing/none.hpp>
#include <moeroute/balancing/phi.hpp>
#include <moeroute/balancing/simbal.hpp>
#include <moeroute/balancing/sinkhorn.hpp>
#include <moeroute/balancing/switch_aux.hpp>
#include <moeroute/balancing/zloss.hpp>
#include <moeroute/potentials.hpp>
#include <moeroute/scoring.hpp>
#include <moeroute/selection/expert_choice.hpp>
#include <moeroute/selection/topk.hpp>
#include <string>
#include <tuple>
#include <vector>

namespace train_moe {

/// Hyper-parameters of the policies, shared so that every policy is compared at the same α.
struct Hyper {
  float alpha = 1e-2f;          ///< aux-loss coefficient of SwitchAux and φ-balancing (both papers' 1e-2)
  float decay = 0.65f;          ///< φ-balancing's ρ, the EMA's weight on history
  float update_rate = 1e-3f;    ///< Loss-Free's u
  float z_beta = 1e-3f;         ///< ZLoss's β
  float simbal_lambda = 1e-2f;  ///< SimBal's λ
};

// Each policy: a name for the command line, a selection and a scoring policy, a balancer type,
// its config from Hyper, and whether it reads `decay` (so a decay sweep runs it once per value).

/// Token choice (top-k, k from the model config) on softmax scores: the routing of every
/// policy that does not say otherwise.
struct TokenChoiceSoftmax {
  using selection = moeroute::TopK<moeroute::runtime_k>;
  using scoring = moeroute::Softmax;
};

/// No balancing.
struct PolicyNone : TokenChoiceSoftmax {
  static constexpr const char* name = "none";
  using balancer = moeroute::NoBalancing;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper&) { return {}; }
};
/// Switch/GShard auxiliary loss α·E·Σ f_e P_e over the batch.
struct PolicySwitch : TokenChoiceSoftmax {
  static constexpr const char* name = "switch";
  using balancer = moeroute::SwitchAux;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper& h) { return {.alpha = h.alpha}; }
};
/// DeepSeek's auxiliary-loss-free selection bias with the sign update.
struct PolicyLossFree : TokenChoiceSoftmax {
  static constexpr const char* name = "lossfree";
  using balancer = moeroute::LossFree<>;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper& h) { return {.update_rate = h.update_rate}; }
};
/// φ-balancing with potential `Pot`.
template <class Pot, const char* Name>
struct PolicyPhi : TokenChoiceSoftmax {
  static constexpr const char* name = Name;
  using balancer = moeroute::PhiBalancing<Pot>;
  static constexpr bool uses_decay = true;
  static typename balancer::Config config(const Hyper& h) {
    typename balancer::Config c;
    c.alpha = h.alpha;
    c.decay = h.decay;
    return c;
  }
};
inline constexpr char phi_entropy_name[] = "phi-entropy";
inline constexpr char phi_squared_name[] = "phi-squared";
inline constexpr char phi_power3_name[] = "phi-power3";
using PolicyPhiEntropy = PolicyPhi<moeroute::Entropy, phi_entropy_name>;
using PolicyPhiSquared = PolicyPhi<moeroute::Squared, phi_squared_name>;
using PolicyPhiPower3 = PolicyPhi<moeroute::Power<3.0>, phi_power3_name>;
/// SimBal: the orthogonality regulariser λ‖W_rᵀW_r − I‖₁ on the router weight.
struct PolicySimBal : TokenChoiceSoftmax {
  static constexpr const char* name = "simbal";
  using balancer = moeroute::SimBal;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper& h) { return {.lambda = h.simbal_lambda}; }
};
/// A composition: φ-balancing with Entropy plus the router z-loss.
struct PolicyPhiEntropyZ : TokenChoiceSoftmax {
  static constexpr const char* name = "phi-entropy+z";
  using balancer = moeroute::Balancers<moeroute::PhiBalancing<moeroute::Entropy>, moeroute::ZLoss>;
  static constexpr bool uses_decay = true;
  static balancer::Config config(const Hyper& h) {
    balancer::Config c;
    std::get<0>(c) = PolicyPhiEntropy::config(h);
    std::get<1>(c).beta = h.z_beta;
    return c;
  }
};
/// Sinkhorn-normalised selection in training (plain top-k in evaluation).
struct PolicySinkhorn : TokenChoiceSoftmax {
  static constexpr const char* name = "sinkhorn";
  using balancer = moeroute::Sinkhorn;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper&) {
    balancer::Config c;
    c.on_no_convergence = moeroute::SinkhornOnNoConvergence::report;  // a training run must not stop
    return c;
  }
};

/// Expert choice (experts take their top C = ceil(k · T / E) tokens of the batch: the compute of
/// top-k routing), no balancer: balanced by construction; a token may get no expert.
struct PolicyExpertChoice {
  static constexpr const char* name = "expert-choice";
  using selection = moeroute::ExpertChoice;
  using scoring = moeroute::Softmax;
  using balancer = moeroute::NoBalancing;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper&) { return {}; }
};
/// √softplus scores (element-wise, renormalised over the top-k) with the Loss-Free bias.
struct PolicySqrtSoftplusLossFree {
  static constexpr const char* name = "sqrtsoftplus+lossfree";
  using selection = moeroute::TopK<moeroute::runtime_k>;
  using scoring = moeroute::SqrtSoftplus;
  using balancer = moeroute::LossFree<>;
  static constexpr bool uses_decay = false;
  static balancer::Config config(const Hyper& h) { return {.update_rate = h.update_rate}; }
};

/// The policies compiled into the experiment, in the order of the default run.
using AllPolicies =
    std::tuple<PolicyNone, PolicySwitch, PolicyLossFree, PolicyPhiEntropy, PolicyPhiSquared, PolicyPhiPower3,
               PolicySimBal, PolicyPhiEntropyZ, PolicySinkhorn, PolicyExpertChoice, PolicySqrtSoftplusLossFree>;

/// Names of every compiled policy, in order.
inline std::vector<std::string> policy_names() {
  std::vector<std::string> v;
  std::apply([&](auto... p) { (v.push_back(decltype(p)::name), ...); }, AllPolicies{});
  return v;
}

/// Calls `f(Policy{})` for the policy called `name`; returns false when no policy has that name.
template <class F>
bool with_policy(const std::string& name, F&& f) {
  bool found = false;
  std::apply([&](auto... p) { ((!found && name == decltype(p)::name ? (f(p), found = true) : false), ...); },
             AllPolicies{});
  return found;
}

/// Whether the policy called `name` reads Hyper::decay (false for unknown names).
inline bool policy_uses_decay(const std::string& name) {
  bool uses = false;
  with_policy(name, [&](auto p) { uses = decltype(p)::uses_decay; });
  return uses;
}

}  // namespace train_moe
