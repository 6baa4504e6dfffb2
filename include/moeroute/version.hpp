// moeroute — library version.
#pragma once

#define MOEROUTE_VERSION_MAJOR 0
#define MOEROUTE_VERSION_MINOR 1
#define MOEROUTE_VERSION_PATCH 0

namespace moeroute {
/// The library version (semantic versioning), as the MOEROUTE_VERSION_* macros above.
inline constexpr int version_major = MOEROUTE_VERSION_MAJOR;
inline constexpr int version_minor = MOEROUTE_VERSION_MINOR;
inline constexpr int version_patch = MOEROUTE_VERSION_PATCH;
}  // namespace moeroute
