// RoPE in place on q and k, one launch for both. The threads of a token split its rotary pairs
// into chunks of VEC pairs (dims [c, c + VEC) with their partners rotary_dim / 2 later) and its
// heads (q's, then k's) over lanes. Each thread rotates its heads kHeadsPerStep at a time (one
// step for all but the widest tokens), with its chunk of the token's cos/sin row loaded once
// per step and every load of a step issued before any store.
#include "kernels/rope.h"

#include <climits>
#include <cstring>
#include <limits>

#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

constexpr int kMaxBlockThreads = 256;
constexpr int kMinBlockThreads = 128;
// Four heads per step keep eight 16-byte loads in flight per thread at about 128 registers.
constexpr int kHeadsPerStep = 4;

// How the threads of a block map to (token, head lane, chunk).
struct RopeShape {
  int chunks;            // rotary pairs / VEC
  int lanes;             // threads per chunk of one token, each rotating its own heads
  int tokens_per_block;  // tokens a block rotates at a time
};

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kMaxBlockThreads)
rope_kernel(const RopeParams p, const RopeShape shape) {
  using A = acc_t<T>;
  const int per_token = shape.chunks * shape.lanes;
  if (threadIdx.x >= per_token * shape.tokens_per_block) return;
  const int chunk = threadIdx.x % shape.chunks;
  const int lane = (threadIdx.x / shape.chunks) % shape.lanes;
  const int64_t tokens = p.batch * p.seq;
  const int64_t half = p.rotary_dim / 2;
  const int64_t col = static_cast<int64_t>(chunk) * VEC;
  const int64_t heads = p.q.heads + p.k.heads;
  // The vector path needs unit strides along head_dim; only VEC == 1 walks other strides.
  const int64_t q_sd = VEC == 1 ? p.q.stride_d : 1;
  const int64_t k_sd = VEC == 1 ? p.k.stride_d : 1;
  // Per pair the map is [[c_lo, -s_lo], [s_hi, c_hi]]; its transpose (the inverse) swaps the
  // sine halves and negates them.
  const int64_t sin_lo_at = p.inverse ? half : 0;
  const A sin_sign = p.inverse ? A(-1) : A(1);

  for (int64_t token = static_cast<int64_t>(blockIdx.x) * shape.tokens_per_block +
                       threadIdx.x / per_token;
       token < tokens; token += static_cast<int64_t>(gridDim.x) * shape.tokens_per_block) {
    const int64_t b = token / p.seq;
    const int64_t s = token - b * p.seq;
    const int64_t pos_at = b * p.pos_stride_b + s * p.pos_stride_s;
    const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[pos_at]
                                          : static_cast<const int32_t*>(p.positions)[pos_at];
    // Never read outside the cache: a position outside it reads row 0, and NaN marks the token.
    const bool in_cache = pos >= 0 && pos < p.cache_rows;
    const int64_t row = in_cache ? pos : 0;
    const C* cos_row = static_cast<const C*>(p.cos) + row * p.cos_row_stride + col;
    const C* sin_row = static_cast<const C*>(p.sin) + row * p.sin_row_stride + col;
    const A cos_scale = in_cache ? A(1) : std::numeric_limits<A>::quiet_NaN();
    const A sin_scale = sin_sign * cos_scale;

    T* q_tok = static_cast<T*>(p.q.data) + b * p.q.stride_b + s * p.q.stride_s;
    T* k_tok = static_cast<T*>(p.k.data) + b * p.k.stride_b + s * p.k.stride_s;
#pragma unroll 1
    for (int64_t h0 = lane; h0 < heads; h0 += static_cast<int64_t>(kHeadsPerStep) * shape.lanes) {
      T* lo_ptr[kHeadsPerStep];
      T* hi_ptr[kHeadsPerStep];
      Vec<T, VEC> x_lo[kHeadsPerStep];
      Vec<T, VEC> x_hi[kHeadsPerStep];
#pragma unroll
      for (int u = 0; u < kHeadsPerStep; ++u) {
        const int64_t h = h0 + static_cast<int64_t>(u) * shape.lanes;
        if (h < heads) {
          const bool is_q = h < p.q.heads;
          T* head = is_q ? q_tok + h * p.q.stride_h : k_tok + (h - p.q.heads) * p.k.stride_h;
          const int64_t sd = is_q ? q_sd : k_sd;
          lo_ptr[u] = head + col * sd;
          hi_ptr[u] = head + (col + half) * sd;
          x_lo[u] = load_vec<T, VEC>(lo_ptr[u]);
          x_hi[u] = load_vec<T, VEC>(hi_ptr[u]);
        }
      }
      // Loaded after the heads' values, so that those loads need not wait for the position.
      A cos_lo[VEC], cos_hi[VEC], sin_lo[VEC], sin_hi[VEC];
      to_acc(load_vec<C, VEC>(cos_row), cos_lo);
      to_acc(load_vec<C, VEC>(cos_row + half), cos_hi);
      to_acc(load_vec<C, VEC>(sin_row + sin_lo_at), sin_lo);
      to_acc(load_vec<C, VEC>(sin_row + (half - sin_lo_at)), sin_hi);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        cos_lo[i] *= cos_scale;
        cos_hi[i] *= cos_scale;
        sin_lo[i] *= sin_scale;
        sin_hi[i] *= sin_scale;
      }
#pragma unroll
      for (int u = 0; u < kHeadsPerStep; ++u) {
        if (h0 + static_cast<int64_t>(u) * shape.lanes < heads) {
          A lo[VEC], hi[VEC], out_lo[VEC], out_hi[VEC];
          to_acc(x_lo[u], lo);
          to_acc(x_hi[u], hi);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            out_lo[i] = lo[i] * cos_lo[i] - hi[i] * sin_lo[i];
            out_hi[i] = hi[i] * cos_hi[i] + lo[i] * sin_hi[i];
          }
          store_vec<T, VEC>(lo_ptr[u], from_acc<T>(out_lo));
          store_vec<T, VEC>(hi_ptr[u], from_acc<T>(out_hi));
        }
      }
    }
  }
}

// Threads per token: chunks * lanes, with lanes giving each thread about kHeadsPerStep heads.
// Tokens per block: enough for kMinBlockThreads, then more until the block is whole warps.
RopeShape plan_shape(int64_t half, int vec, int64_t heads) {
  RopeShape shape{};
  shape.chunks = static_cast<int>(half / vec);
  const int64_t max_lanes = kMaxBlockThreads / shape.chunks;
  const int64_t lanes = ceil_div(heads, kHeadsPerStep);
  shape.lanes = static_cast<int>(lanes < max_lanes ? lanes : max_lanes);
  const int per_token = shape.chunks * shape.lanes;
  int tokens = static_cast<int>(ceil_div(kMinBlockThreads, per_token));
  while (tokens * per_token % 32 != 0 && (tokens + 1) * per_token <= kMaxBlockThreads) ++tokens;
  shape.tokens_per_block = tokens;
  return shape;
}

template <typename T, typename C>
void launch_typed(const RopeParams& p, cudaStream_t stream) {
  const int64_t half = p.rotary_dim / 2;
  const bool unit_d = p.q.stride_d == 1 && p.k.stride_d == 1;
  const int vec = unit_d ? vector_width<T>({p.q.data, p.k.data, p.cos, p.sin},
                                           {p.q.stride_b, p.q.stride_s, p.q.stride_h,
                                            p.k.stride_b, p.k.stride_s, p.k.stride_h,
                                            p.cos_row_stride, p.sin_row_stride},
                                           half)
                         : 1;
  const RopeShape shape = plan_shape(half, vec, p.q.heads + p.k.heads);
  const int threads =
      static_cast<int>(ceil_div(shape.chunks * shape.lanes * shape.tokens_per_block, 32) * 32);
  const int64_t blocks = ceil_div(p.batch * p.seq, shape.tokens_per_block);
  const auto grid = static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    rope_kernel<T, C, vec_c.value><<<grid, threads, 0, stream>>>(p, shape);
  });
}

}  // namespace

void rope_launch(const RopeParams& p, cudaStream_t stream) {
  dispatch_float(p.x_dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    dispatch_same_or_f32<T>(p.cache_dtype, [&](auto c) {
      launch_typed<T, typename decltype(c)::type>(p, stream);
    });
  });
}

}  // namespace unsloth_ext
