// On the CPU one thread owns every coordinate of a row: partial sums are already totals.
#pragma once

#include <cstdint>

namespace softmix::cpu {

struct SerialLanes {
  static constexpr int64_t first() { return 0; }
  static constexpr int64_t step() { return 1; }
  template <typename T>
  T sum(T partial) const { return partial; }
  bool is_leader() const { return true; }
  void sync() const {}
};

// Rows per parallel_for chunk so each chunk does roughly `work` element operations.
inline int64_t grain_for(int64_t work_per_row, int64_t work = 32768) {
  return work_per_row >= work ? 1 : work / (work_per_row > 0 ? work_per_row : 1);
}

}  // namespace softmix::cpu
