// moeroute — umbrella header: the router, every host-side policy and the reference backend.
#pragma once

#include "balancing/compose.hpp"
#include "balancing/loss_free.hpp"
#include "balancing/none.hpp"
#include "balancing/phi.hpp"
#include "balancing/simbal.hpp"
#include "balancing/sinkhorn.hpp"
#include "balancing/switch_aux.hpp"
#include "balancing/update_rules.hpp"
#include "balancing/zloss.hpp"
#include "comm/nocomm.hpp"
#include "concepts.hpp"
#include "core.hpp"
#include "dispatch.hpp"
#include "linear_gate.hpp"
#include "metrics.hpp"
#include "potentials.hpp"
#include "router.hpp"
#include "routing.hpp"
#include "scoring.hpp"
#include "selection/expert_choice.hpp"
#include "selection/group_topk.hpp"
#include "selection/topk.hpp"
#include "state.hpp"
#include "version.hpp"

// The fast CPU backend needs xsimd; it is part of the umbrella only where xsimd is available
// (include "backend/cpu/engine.hpp" directly to require it).
#if __has_include(<xsimd/xsimd.hpp>)
#include "backend/cpu/engine.hpp"
#endif
