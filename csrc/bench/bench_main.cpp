// Standalone benchmark of the op host entries (no Python), for Nsight Compute / Systems:
//   unsloth_ext_bench <op> [rows] [cols] [iterations]
// Prints the median time per call and the GB/s it implies (each tensor read or written once).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ops/ops.h"

namespace {

struct Bench {
  std::function<void()> run;
  double bytes;
};

using Factory = std::function<std::vector<std::pair<std::string, Bench>>(int64_t, int64_t)>;

double nbytes(std::initializer_list<at::Tensor> tensors) {
  double total = 0;
  for (const auto& t : tensors) total += static_cast<double>(t.numel()) * t.element_size();
  return total;
}

std::vector<std::pair<std::string, Bench>> rms_norm_benches(int64_t rows, int64_t cols) {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::Tensor x = at::randn({rows, cols}, opts);
  at::Tensor w = at::randn({cols}, opts);
  auto [y, rstd] = unsloth_ext::rms_norm_fwd(x, w, 1e-6, false);
  at::Tensor dy = at::randn_like(y);
  auto [dx, dw] = unsloth_ext::rms_norm_bwd(dy, x, w, rstd, false);
  return {
      {"rms_norm_fwd", {[=] { unsloth_ext::rms_norm_fwd(x, w, 1e-6, false); },
                        nbytes({x, w, y, rstd})}},
      {"rms_norm_bwd", {[=] { unsloth_ext::rms_norm_bwd(dy, x, w, rstd, false); },
                        nbytes({dy, x, w, rstd, dx, dw})}},
  };
}

const std::map<std::string, Factory>& registry() {
  static const std::map<std::string, Factory> ops = {
      {"rms_norm", rms_norm_benches},
  };
  return ops;
}

double median_ms(const std::function<void()>& fn, int iterations) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    fn();
    stop.record();
    stop.synchronize();
    times.push_back(start.elapsed_time(stop));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const auto& ops = registry();
  if (argc < 2 || ops.count(argv[1]) == 0) {
    std::fprintf(stderr, "usage: %s <op> [rows=16384] [cols=4096] [iterations=20]\nops:", argv[0]);
    for (const auto& [name, factory] : ops) std::fprintf(stderr, " %s", name.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  const int64_t rows = argc > 2 ? std::atoll(argv[2]) : 16384;
  const int64_t cols = argc > 3 ? std::atoll(argv[3]) : 4096;
  const int iterations = argc > 4 ? std::atoi(argv[4]) : 20;
  for (const auto& [name, bench] : ops.at(argv[1])(rows, cols)) {
    const double ms = median_ms(bench.run, iterations);
    std::printf("%-16s [%lld, %lld] bf16  %9.1f us  %7.0f GB/s\n", name.c_str(),
                static_cast<long long>(rows), static_cast<long long>(cols), ms * 1e3,
                bench.bytes / (ms * 1e-3) / 1e9);
  }
  return 0;
}
