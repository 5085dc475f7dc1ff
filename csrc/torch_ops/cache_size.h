// The CPU's last-level cache size: a kernel whose input and output together are larger
// writes its output past the caches (non-temporal stores), since it could not stay in them
// for the next op anyway and an ordinary store first reads every line it fills.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include <c10/util/Exception.h>

namespace sa_kernels {
namespace cpu {

// Linux names every cache of cpu0 in sysfs (index0, index1, ...; the highest level is the
// last); where that is missing, 32 MiB. SA_KERNELS_CPU_CACHE_BYTES overrides the size (the
// tests set 0 so that every full, aligned vector streams); a value that is not one is
// ignored with a warning. Read once per process.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("SA_KERNELS_CPU_CACHE_BYTES")) {
      char* end = nullptr;
      const long long value = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && value >= 0) return int64_t(value);
      TORCH_WARN("SA_KERNELS_CPU_CACHE_BYTES=", env, " is not a byte count (a whole number, 0 or "
                 "more); the cache size read from the system is used instead");
    }
    int64_t found = 0;
    int best_level = 0;
    for (int index = 0; index < 16; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int level = 0;
      std::string size;
      if (!(level_file >> level) || !(size_file >> size)) break;
      char* end = nullptr;
      int64_t value = std::strtoll(size.c_str(), &end, 10);
      if (*end == 'K') value <<= 10;
      if (*end == 'M') value <<= 20;
      if (level >= best_level && value > 0) {
        best_level = level;
        found = value;
      }
    }
    return found > 0 ? found : int64_t(32) << 20;
  }();
  return bytes;
}

}  // namespace cpu
}  // namespace sa_kernels
