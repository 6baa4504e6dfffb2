// moeroute — umbrella header: the router, every host-side policy and the reference backend.
#pragma once

#include "balancing/compose.hpp"
#include "balancing/none.hpp"
#include "balancing/sinkhorn.hpp"
#include "comm/nocomm.hpp"
#include "concepts.hpp"
#include "core.hpp"
#include "router.hpp"
#include "routing.hpp"
#include "scoring.hpp"
#include "selection/expert_choice.hpp"
#include "selection/group_topk.hpp"
#include "selection/topk.hpp"
#include "version.hpp"
