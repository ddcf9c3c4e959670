// NF4 dequantization and the small-M GEMV that reads the packed weight directly.
//
// Dequantize: each thread turns 4 packed bytes (8 values) into one 16-byte store, so a warp reads
// 128 contiguous bytes and writes 512; the 16 levels sit in shared memory (one bank each, so any
// lookup pattern is conflict-free). Values are rounded exactly as bitsandbytes rounds them:
// fp32 level * fp32 absmax, then one rounding to the 16-bit type.
//
// GEMV: tensor cores do the multiply. A warp owns 16 weight rows (the mma's A operand, rows g and
// g + 8 of each lane's quad) and a fixed range of K; each lane reads 8 packed bytes of both rows
// per 64-value slab, so a quad covers one slab, which lies in one absmax block (blocksize >= 64).
// Within a slab the K order given to the mma is permuted (lane t's 16 values feed mma steps 0..3,
// four at a time), and x, the B operand, is read with the same permutation, so the products pair
// up correctly. A byte becomes the operand register (two 16-bit levels) with one PRMT and one
// shared-memory lookup; the block's absmax is applied to the fp32 mma result per slab. So the
// levels enter rounded to the 16-bit type (bitsandbytes' own GEMV also rounds the absmax and the
// product), a per-weight error of the size of the 16-bit rounding of a dequantized weight. The 16
// warps of a block split K and add their partial sums through shared memory in a fixed order.
// Each warp keeps one chunk in registers beyond the one it computes, and asks L2 for the two
// after that.
#include "kernels/nf4.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

// bitsandbytes' NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]), in code order.
__constant__ float kNF4Levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int kDequantThreads = 256;
constexpr int kDequantUnroll = 4;  // 4-byte groups per thread, all loads issued first
constexpr int kGroup = 8;          // values per 4-byte group

constexpr int kGemvThreads = 512;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kTileRows = 16;
constexpr int kChunkSlabs = 4;  // slabs a warp loads per round (64 bytes per lane in flight)
constexpr int kMaxTilesPerRound = 8;
// Chunks requested from L2 ahead of the register loads: DRAM latency is then hidden without
// holding more chunks in registers.
constexpr int kPrefetchItems = 2;
// Byte -> pair-of-levels table, one copy per lane (conflict-free lookups of random bytes). An
// entry spans 256 bytes so that PRMT can form the address (byte << 8 | lane * 4) in one step.
constexpr int kLutEntryBytes = 256;
constexpr int kLutBytes = 256 * kLutEntryBytes;

__device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The absmax of block `block`, decoded as bitsandbytes does (multiply, then add the offset,
// rounding after each).
__device__ __forceinline__ float block_scale(const NF4View& w, int64_t block, const float* code2) {
  if (w.absmax2 == nullptr) return __ldg(static_cast<const float*>(w.absmax) + block);
  const uint8_t code = __ldg(static_cast<const uint8_t*>(w.absmax) + block);
  return __fadd_rn(__fmul_rn(code2[code], __ldg(w.absmax2 + block / kNF4AbsmaxBlock)), w.offset);
}

// The second-level code table in shared memory (only read for double-quantized weights).
__device__ __forceinline__ void load_code2(const NF4View& w, float* code2) {
  if (w.absmax2 == nullptr) return;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = w.code2[i];
}

// Nibble i (0..7) of a little-endian word of 4 packed bytes: the high nibble of a byte first.
__device__ __forceinline__ uint32_t nibble(uint32_t word, int i) {
  return (word >> (8 * (i / 2) + 4 * (1 - i % 2))) & 15u;
}

template <typename T>
__global__ void __launch_bounds__(kDequantThreads) nf4_dequantize_kernel(const NF4DequantParams p) {
  __shared__ float levels[16];
  __shared__ float code2[256];
  if (threadIdx.x < 16) levels[threadIdx.x] = kNF4Levels[threadIdx.x];
  load_code2(p.w, code2);
  __syncthreads();
  const int64_t groups = p.w.numel / kGroup;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * kDequantUnroll * blockDim.x + threadIdx.x;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(p.w.packed);
  uint32_t words[kDequantUnroll];
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t g = first + static_cast<int64_t>(u) * blockDim.x;
    if (g < groups) words[u] = __ldcs(packed + g);
  }
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t g = first + static_cast<int64_t>(u) * blockDim.x;
    if (g < groups) {
      const float scale = block_scale(p.w, (g * kGroup) >> p.w.log2_blocksize, code2);
      float v[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) v[i] = __fmul_rn(levels[nibble(words[u], i)], scale);
      store_vec<T, kGroup>(static_cast<T*>(p.out) + g * kGroup, from_acc<T>(v));
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &v, sizeof(bits));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

// The operand register for packed byte `byte` (0..3) of `word`: (level of the high nibble, level
// of the low nibble), read from this lane's copy of the table.
__device__ __forceinline__ uint32_t lut_pair(const unsigned char* lut, uint32_t word, int byte,
                                             uint32_t lane_offset) {
  const uint32_t offset = __byte_perm(word, lane_offset, 0x5504u | (byte << 4));
  return *reinterpret_cast<const uint32_t*>(lut + offset);
}

// d += A(16x16, row) * B(16x8, col) with fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// One round of loads of a warp: kChunkSlabs slabs of rows g and g + 8 of a tile.
struct GemvChunk {
  uint2 w[kChunkSlabs][2];         // 8 packed bytes (16 values) per row
  uint32_t scale[kChunkSlabs][2];  // fp32 absmax bits, or the absmax code
  float scale2[kChunkSlabs][2];    // the code's second-level scale (double quantization)
};

// The lane's part of tile `tile`, slabs [slab0, min(slab0 + kChunkSlabs, slab_end)). Rows past
// the end of the weight read the last row (their results are never stored).
__device__ __forceinline__ void load_chunk(GemvChunk& c, const NF4GemvParams& p, int64_t tile,
                                           int64_t slab0, int64_t slab_end, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int64_t slabs = slab_end - slab0;
  const int blocksize_mask = (1 << p.w.log2_blocksize) - 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = min(tile * kTileRows + g + 8 * r, p.n - 1);
    const int64_t first = row * p.k + slab0 * kNF4GemvSlab;
    const uint2* packed = reinterpret_cast<const uint2*>(p.w.packed + first / 2) + t;
    const int64_t block0 = first >> p.w.log2_blocksize;
    const int in_block = static_cast<int>(first) & blocksize_mask;
#pragma unroll
    for (int u = 0; u < kChunkSlabs; ++u) {
      if (u >= slabs) break;
      c.w[u][r] = __ldcs(packed + u * (kNF4GemvSlab / 16));
      const int64_t block = block0 + ((in_block + u * kNF4GemvSlab) >> p.w.log2_blocksize);
      if (p.w.absmax2 != nullptr) {
        c.scale[u][r] = __ldg(static_cast<const uint8_t*>(p.w.absmax) + block);
        c.scale2[u][r] = __ldg(p.w.absmax2 + block / kNF4AbsmaxBlock);
      } else {
        c.scale[u][r] = __float_as_uint(__ldg(static_cast<const float*>(p.w.absmax) + block));
      }
    }
  }
}

// Asks L2 for a byte range ahead of its use, holding no registers (sm_90: the whole range; older
// archs: its first line).
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
#endif
}

// Prefetches what load_chunk will read for the same arguments: lanes 0..15 the packed bytes of
// the tile's rows, lanes 16..31 their absmax entries.
__device__ __forceinline__ void prefetch_chunk(const NF4GemvParams& p, int64_t tile,
                                               int64_t slab0, int64_t slab_end, int lane) {
  const int64_t slabs = min(slab_end - slab0, static_cast<int64_t>(kChunkSlabs));
  if (slabs <= 0) return;
  const int64_t row = min(tile * kTileRows + lane % kTileRows, p.n - 1);
  const int64_t first = row * p.k + slab0 * kNF4GemvSlab;
  if (lane < kTileRows) {
    prefetch_l2(p.w.packed + first / 2, static_cast<uint32_t>(slabs * kNF4GemvSlab / 2));
  } else {
    const int64_t block = first >> p.w.log2_blocksize;
    const int entry_bytes = p.w.absmax2 != nullptr ? 1 : 4;
    // Bulk prefetches take 16-byte aligned ranges (allocations are, so the range stays inside).
    const auto entry = reinterpret_cast<uintptr_t>(p.w.absmax) + block * entry_bytes;
    prefetch_l2(reinterpret_cast<const void*>(entry & ~uintptr_t{15}), 16);
  }
}

// acc[mt][i] += the chunk's contribution to the lane's accumulators for m-tile mt: weight rows
// g (i = 0, 1) and g + 8 (i = 2, 3), x rows 8 mt + 2t + (i % 2).
template <typename T>
__device__ __forceinline__ void compute_chunk(const GemvChunk& c, float (&acc)[2][4],
                                              const NF4GemvParams& p, const unsigned char* lut,
                                              const float* code2, int64_t slab0, int64_t slab_end,
                                              int m_tiles, int lane) {
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_offset = lane * 4;
  const int64_t slabs = slab_end - slab0;
  const T* x = static_cast<const T*>(p.x) + slab0 * kNF4GemvSlab + 16 * t;
#pragma unroll
  for (int u = 0; u < kChunkSlabs; ++u) {
    if (u >= slabs) break;
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      scale[r] = p.w.absmax2 == nullptr
                     ? __uint_as_float(c.scale[u][r])
                     : __fadd_rn(__fmul_rn(code2[c.scale[u][r]], c.scale2[u][r]), p.w.offset);
    }
    // The second m-tile (more than 8 rows of x) looks the weights up again rather than keeping
    // them: registers matter more than the few extra lookups.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      if (mt >= m_tiles) break;
      // Values 16t .. 16t + 15 of this slab of x row g + 8 mt (the B operand): four per step.
      const int64_t m = g + 8 * mt;
      uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
      if (m < p.m) {
        const uint4* src = reinterpret_cast<const uint4*>(x + m * p.k + u * kNF4GemvSlab);
        lo = __ldg(src);
        hi = __ldg(src + 1);
      }
      const uint32_t xw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      float d[4] = {};
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        // Bytes 2 step and 2 step + 1 of each row's 8, values 4 step .. 4 step + 3, go in as the
        // mma's k = 2t, 2t + 1 and 2t + 8, 2t + 9; x words 2 step, 2 step + 1 match them.
        const uint32_t row_lo = step < 2 ? c.w[u][0].x : c.w[u][0].y;
        const uint32_t row_hi = step < 2 ? c.w[u][1].x : c.w[u][1].y;
        const int b = (2 * step) % 4;
        const uint32_t a[4] = {lut_pair(lut, row_lo, b, lane_offset),
                               lut_pair(lut, row_hi, b, lane_offset),
                               lut_pair(lut, row_lo, b + 1, lane_offset),
                               lut_pair(lut, row_hi, b + 1, lane_offset)};
        mma_16x8x16<T>(d, a, xw[2 * step], xw[2 * step + 1]);
      }
      acc[mt][0] += scale[0] * d[0];
      acc[mt][1] += scale[0] * d[1];
      acc[mt][2] += scale[1] * d[2];
      acc[mt][3] += scale[1] * d[3];
    }
  }
}

template <typename B>
__device__ __forceinline__ float lora_b_dot(const NF4GemvParams& p, int64_t m, int64_t n) {
  const B* b = static_cast<const B*>(p.lora_b) + n * p.rank;
  const float* xa = p.lora_xa + m * p.rank;
  float sum = 0;
  for (int64_t j = 0; j < p.rank; ++j) sum += xa[j] * convert<float>(b[j]);
  return sum;
}

// Sums the warps' partials of `count` tiles from `first_tile` in a fixed order, adds the LoRA
// term, and writes y. partial: [tile][warp][4 * m_tiles][32 lanes].
template <typename T>
__device__ void finish_tiles(const NF4GemvParams& p, const float* partial, int64_t first_tile,
                             int count, int m_tiles) {
  const int regs = 4 * m_tiles;
  const int rows_m = kTileRows * static_cast<int>(p.m);
  for (int o = threadIdx.x; o < count * rows_m; o += blockDim.x) {
    const int r = o % kTileRows;
    const int m = (o / kTileRows) % static_cast<int>(p.m);
    const int slot = o / rows_m;
    const int64_t n = (first_tile + slot) * kTileRows + r;
    if (n >= p.n) continue;
    const int lane = (r % 8) * 4 + (m % 8) / 2;
    const int reg = m % 2 + 2 * (r / 8) + 4 * (m / 8);
    const float* part = partial + (slot * kGemvWarps * regs + reg) * 32 + lane;
    float sum = 0;
    for (int w = 0; w < kGemvWarps; ++w) sum += part[w * regs * 32];
    if (p.lora_a != nullptr) {
      sum += p.lora_b_dtype == DType::kFloat32 ? lora_b_dot<float>(p, m, n)
                                               : lora_b_dot<T>(p, m, n);
    }
    static_cast<T*>(p.y)[m * p.n + n] = convert<T>(sum);
  }
}

// One block per SM; block b owns tiles [b * tiles / grid, (b + 1) * tiles / grid) (a balanced
// split) and warp w the slabs [w * slabs / 16, (w + 1) * slabs / 16) of each. Every warp walks
// the same (tile, chunk) sequence, loading the next chunk before computing the current one, and
// leaves its sums for each tile in shared memory; each round of `tiles_per_round` tiles is then
// finished by the whole block.
template <typename T>
__global__ void __launch_bounds__(kGemvThreads, 1)
nf4_gemv_kernel(const NF4GemvParams p, int tiles_per_round) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float code2[256];
  unsigned char* lut = smem;
  float* partial = reinterpret_cast<float*>(smem + kLutBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m_tiles = p.m > 8 ? 2 : 1;
  const int64_t tiles = div_up(p.n, kTileRows);
  const int64_t tile_begin = blockIdx.x * tiles / gridDim.x;
  const int64_t tile_end = (blockIdx.x + 1) * tiles / gridDim.x;
  const int64_t slabs = p.k / kNF4GemvSlab;
  const int64_t slab_begin = warp * slabs / kGemvWarps;
  const int64_t slab_end = (warp + 1) * slabs / kGemvWarps;
  const int chunks = static_cast<int>(div_up(div_up(slabs, kGemvWarps), kChunkSlabs));

  GemvChunk chunk_a, chunk_b;
  int64_t tile = tile_begin;
  int chunk = 0;
  // The item kPrefetchItems past the next register load, already requested from L2.
  int64_t ahead_tile = tile_begin;
  int ahead_chunk = 0;
  const auto advance_ahead = [&] {
    if (++ahead_chunk == chunks) {
      ahead_chunk = 0;
      ++ahead_tile;
    }
    if (ahead_tile < tile_end) {
      prefetch_chunk(p, ahead_tile, slab_begin + ahead_chunk * kChunkSlabs, slab_end, lane);
    }
  };
  if (tile < tile_end) load_chunk(chunk_a, p, tile, slab_begin, slab_end, lane);
  for (int i = 0; i < kPrefetchItems; ++i) advance_ahead();
  // Build the tables while the first loads are in flight.
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int byte = i / 32;
    reinterpret_cast<uint32_t*>(lut + byte * kLutEntryBytes)[i % 32] =
        pack_pair<T>(kNF4Levels[byte >> 4], kNF4Levels[byte & 15]);
  }
  load_code2(p.w, code2);
  __syncthreads();

  float acc[2][4] = {};
  const int regs = 4 * m_tiles;
  // One step: load the chunk after this one into `next`, add `cur`, and after a tile's last
  // chunk leave its sums (finishing the round when full). False once the block's tiles are done.
  const auto step = [&](const GemvChunk& cur, GemvChunk& next) {
    const bool tile_done = chunk == chunks - 1;
    const int64_t next_tile = tile_done ? tile + 1 : tile;
    const int next_chunk = tile_done ? 0 : chunk + 1;
    if (next_tile < tile_end) {
      load_chunk(next, p, next_tile, slab_begin + next_chunk * kChunkSlabs, slab_end, lane);
    }
    advance_ahead();
    compute_chunk<T>(cur, acc, p, lut, code2, slab_begin + chunk * kChunkSlabs, slab_end,
                     m_tiles, lane);
    if (tile_done) {
      const int slot = static_cast<int>((tile - tile_begin) % tiles_per_round);
      float* mine = partial + (slot * kGemvWarps + warp) * regs * 32 + lane;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (mt < m_tiles) mine[(4 * mt + j) * 32] = acc[mt][j];
          acc[mt][j] = 0;
        }
      }
      if (slot == tiles_per_round - 1 || next_tile == tile_end) {
        __syncthreads();
        finish_tiles<T>(p, partial, tile - slot, slot + 1, m_tiles);
        __syncthreads();
      }
    }
    tile = next_tile;
    chunk = next_chunk;
    return tile < tile_end;
  };
  // Two steps per iteration, so the two chunk buffers swap roles without copies.
  if (tile < tile_end) {
    while (step(chunk_a, chunk_b) && step(chunk_b, chunk_a)) {
    }
  }
}

// lora_xa[m, j] = lora_scale * x[m] . A[j]: one block per adapter row j, all rows of x.
template <typename T, typename A>
__global__ void __launch_bounds__(256) nf4_lora_a_kernel(const NF4GemvParams p) {
  constexpr int kVec = 8;
  __shared__ float sums[kNF4GemvMaxRows][8];
  const int64_t j = blockIdx.x;
  const A* a = static_cast<const A*>(p.lora_a) + j * p.k;
  const T* x = static_cast<const T*>(p.x);
  float acc[kNF4GemvMaxRows] = {};
  for (int64_t v = threadIdx.x; v < p.k / kVec; v += blockDim.x) {
    float af[kVec];
    to_acc(load_vec<A, kVec>(a + v * kVec), af);
#pragma unroll
    for (int m = 0; m < kNF4GemvMaxRows; ++m) {
      if (m < p.m) {
        float xf[kVec];
        to_acc(load_vec<T, kVec>(x + m * p.k + v * kVec), xf);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[m] += xf[e] * af[e];
      }
    }
  }
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int m = 0; m < kNF4GemvMaxRows; ++m) {
    const float s = warp_sum(acc[m]);
    if (m < p.m && threadIdx.x % 32 == 0) sums[m][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < p.m) {
    float total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += sums[threadIdx.x][w];
    p.lora_xa[threadIdx.x * p.rank + j] = p.lora_scale * total;
  }
}

// Calls f(TypeTag<T>{}) for the 16-bit type d names.
template <typename F>
void dispatch_16bit(DType d, F&& f) {
  switch (d) {
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    default:
      throw std::invalid_argument(std::string("NF4 kernels produce bfloat16 or float16, not ") +
                                  dtype_name(d));
  }
}

// Dynamic shared memory a block may opt into on the current device, cached per device.
size_t max_dynamic_smem() {
  thread_local int device = -1;
  thread_local int bytes = 0;
  int current = 0;
  cudaGetDevice(&current);
  if (current != device) {
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, current);
    device = current;
  }
  return static_cast<size_t>(bytes);
}

template <typename T>
void gemv_typed(const NF4GemvParams& p, cudaStream_t stream) {
  if (p.lora_a != nullptr) {
    dispatch_same_or_f32<T>(p.lora_a_dtype, [&](auto a) {
      nf4_lora_a_kernel<T, typename decltype(a)::type>
          <<<static_cast<unsigned>(p.rank), 256, 0, stream>>>(p);
    });
  }
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t grid = std::min<int64_t>(tiles, sm_count());
  const int m_tiles = p.m > 8 ? 2 : 1;
  const size_t tile_bytes = static_cast<size_t>(kGemvWarps) * 4 * m_tiles * 32 * sizeof(float);
  // Static shared memory (code2) is part of the opt-in limit too.
  const size_t room = max_dynamic_smem() - kLutBytes - 256 * sizeof(float);
  const int64_t tiles_per_round =
      std::max<int64_t>(1, std::min<int64_t>({ceil_div(tiles, grid), kMaxTilesPerRound,
                                              static_cast<int64_t>(room / tile_bytes)}));
  const size_t smem = kLutBytes + tiles_per_round * tile_bytes;
  const auto kernel = nf4_gemv_kernel<T>;
  prepare_blocks(kernel, kGemvThreads, smem);
  kernel<<<static_cast<unsigned>(grid), kGemvThreads, smem, stream>>>(
      p, static_cast<int>(tiles_per_round));
}

}  // namespace

void nf4_dequantize_launch(const NF4DequantParams& p, cudaStream_t stream) {
  dispatch_16bit(p.out_dtype, [&](auto t) {
    const int64_t groups = p.w.numel / kGroup;
    const auto grid = static_cast<unsigned>(ceil_div(groups, kDequantThreads * kDequantUnroll));
    nf4_dequantize_kernel<typename decltype(t)::type><<<grid, kDequantThreads, 0, stream>>>(p);
  });
}

void nf4_gemv_launch(const NF4GemvParams& p, cudaStream_t stream) {
  dispatch_16bit(p.dtype, [&](auto t) { gemv_typed<typename decltype(t)::type>(p, stream); });
}

}  // namespace unsloth_ext
