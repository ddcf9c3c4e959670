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
// Each warp keeps the loads of its next kGemvRing slabs in flight in registers. The number of x
// rows (one or two m-tiles of 8) and the absmax format are template arguments, so the walk has
// no per-slab branches on them.
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
constexpr int kDequantUnroll = 2;  // 4-byte groups per thread
constexpr int kGroup = 8;          // values per 4-byte group

constexpr int kGemvThreads = 512;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kTileRows = 16;
// Slabs whose loads a warp keeps in flight beyond the one it computes, 16 packed bytes per lane
// each. On the H200 depths 2 to 8 time the same: the walk is bound by instruction issue.
constexpr int kGemvRing = 4;
// Byte -> pair-of-levels table, one copy per lane (conflict-free lookups of random bytes). An
// entry spans 256 bytes so that PRMT can form the address (byte << 8 | lane * 4) in one step.
constexpr int kLutEntryBytes = 256;
constexpr int kLutBytes = 256 * kLutEntryBytes;

// The absmax of one block as loaded: the fp32 absmax, or for a double-quantized weight its uint8
// code and the second-level scale.
struct BlockAbsmax {
  float value;
  uint32_t code;
};

__device__ __forceinline__ BlockAbsmax load_absmax(const NF4View& w, int64_t block) {
  if (w.absmax2 == nullptr) return {__ldg(static_cast<const float*>(w.absmax) + block), 0};
  return {__ldg(w.absmax2 + block / kNF4AbsmaxBlock),
          __ldg(static_cast<const uint8_t*>(w.absmax) + block)};
}

// A double-quantized absmax decoded as bitsandbytes does: its code's value times the
// second-level scale, plus the offset, rounding after each.
__device__ __forceinline__ float decode_double_quant(float code_value, float scale2,
                                                     float offset) {
  return __fadd_rn(__fmul_rn(code_value, scale2), offset);
}

__device__ __forceinline__ float decode_absmax(const NF4View& w, const BlockAbsmax& a,
                                               const float* code2) {
  if (w.absmax2 == nullptr) return a.value;
  return decode_double_quant(code2[a.code], a.value, w.offset);
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

// Each thread dequantizes kDequantUnroll groups. Their packed words and absmax go out before the
// block fills its tables, so the loads' latency covers the block's start.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads) nf4_dequantize_kernel(const NF4DequantParams p) {
  __shared__ float levels[16];
  __shared__ float code2[256];
  const int64_t groups = p.w.numel / kGroup;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * kDequantUnroll * blockDim.x + threadIdx.x;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(p.w.packed);
  uint32_t words[kDequantUnroll];
  BlockAbsmax absmax[kDequantUnroll];
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t g = first + static_cast<int64_t>(u) * blockDim.x;
    if (g < groups) {
      words[u] = __ldcs(packed + g);
      absmax[u] = load_absmax(p.w, (g * kGroup) >> p.w.log2_blocksize);
    }
  }
  if (threadIdx.x < 16) levels[threadIdx.x] = kNF4Levels[threadIdx.x];
  load_code2(p.w, code2);
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t g = first + static_cast<int64_t>(u) * blockDim.x;
    if (g < groups) {
      const float scale = decode_absmax(p.w, absmax[u], code2);
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
// of the low nibble), read from this lane's copy of the table. lane_entry is the shared-memory
// address of the lane's word in entry 0; the table is 64 KiB aligned, so one PRMT puts the byte
// into bits 8..15 of that address and forms the whole address.
__device__ __forceinline__ uint32_t lut_pair(uint32_t word, int byte, uint32_t lane_entry) {
  const uint32_t address = __byte_perm(word, lane_entry, 0x7604u | (byte << 4));
  uint32_t pair;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(pair) : "r"(address));
  return pair;
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

// What a lane reads of one slab: 8 packed bytes (16 values) of weight rows g and g + 8, and
// their absmax entries.
template <bool kDouble>
struct GemvSlab {
  uint2 w[2];
  uint32_t scale[2];  // fp32 absmax bits, or the double-quantized absmax code
  float scale2[2];    // the code's second-level scale (double quantization only)
};

// A position in a warp's walk: slab `slab` of tile `tile`. A warp walks its block's tiles in
// order and, in each, the same slab range [begin, end).
struct GemvCursor {
  int64_t tile;
  uint32_t slab;
  __device__ __forceinline__ void advance(uint32_t begin, uint32_t end) {
    if (++slab == end) {
      slab = begin;
      ++tile;
    }
  }
};

// Where one of a lane's weight rows of a tile starts, so that a slab's loads need only 32-bit
// offsets: slab s is packed[4 s], its absmax entry absmax[(block_lo + s) >> shift] (shift: log2 of
// the slabs per absmax block), and that entry j's second-level scale absmax2[(group_lo + j) / 256].
struct GemvRow {
  const uint2* packed;
  const void* absmax;
  const float* absmax2;
  uint32_t block_lo;
  uint32_t group_lo;
};

// The lane's rows g and g + 8 of `tile`. Rows past the end of the weight read the last row (their
// results are never stored).
__device__ __forceinline__ void tile_rows(GemvRow (&rows)[2], const NF4GemvParams& p,
                                          int64_t tile, int g, int t, int shift) {
  const int64_t slabs = p.k / kNF4GemvSlab;
  const int entry_bytes = p.w.absmax2 != nullptr ? 1 : 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t flat = min(tile * kTileRows + g + 8 * r, p.n - 1) * slabs;
    const int64_t block = flat >> shift;
    rows[r].packed = reinterpret_cast<const uint2*>(p.w.packed) + flat * 4 + t;
    rows[r].absmax = static_cast<const uint8_t*>(p.w.absmax) + block * entry_bytes;
    rows[r].absmax2 = p.w.absmax2 + block / kNF4AbsmaxBlock;
    rows[r].block_lo = static_cast<uint32_t>(flat & ((int64_t{1} << shift) - 1));
    rows[r].group_lo = static_cast<uint32_t>(block % kNF4AbsmaxBlock);
  }
}

template <bool kDouble>
__device__ __forceinline__ void load_slab(GemvSlab<kDouble>& s, const GemvRow (&rows)[2],
                                          uint32_t slab, int shift) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s.w[r] = __ldcs(rows[r].packed + 4 * slab);
    const uint32_t entry = (rows[r].block_lo + slab) >> shift;
    if constexpr (kDouble) {
      s.scale[r] = __ldg(static_cast<const uint8_t*>(rows[r].absmax) + entry);
      s.scale2[r] = __ldg(rows[r].absmax2 + (rows[r].group_lo + entry) / kNF4AbsmaxBlock);
    } else {
      s.scale[r] = __float_as_uint(__ldg(static_cast<const float*>(rows[r].absmax) + entry));
    }
  }
}

// acc[mt][i] += the slab's contribution to the lane's accumulators for m-tile mt: weight rows
// g (i = 0, 1) and g + 8 (i = 2, 3), x rows 8 mt + 2t + (i % 2). x_rows[mt] points at values
// 16t.. of the lane's x row g + 8 mt, or is null past the last row of x.
template <typename T, int kMTiles, bool kDouble>
__device__ __forceinline__ void compute_slab(const GemvSlab<kDouble>& s, float (&acc)[kMTiles][4],
                                             const T* const (&x_rows)[kMTiles], uint32_t slab,
                                             const float* code2, float offset,
                                             uint32_t lane_entry) {
  float scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    scale[r] = kDouble ? decode_double_quant(code2[s.scale[r]], s.scale2[r], offset)
                       : __uint_as_float(s.scale[r]);
  }
  uint32_t xw[kMTiles][8];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
    if (x_rows[mt] != nullptr) {
      const uint4* src = reinterpret_cast<const uint4*>(x_rows[mt] + slab * kNF4GemvSlab);
      lo = __ldg(src);
      hi = __ldg(src + 1);
    }
    const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) xw[mt][i] = words[i];
  }
  float d[kMTiles][4] = {};
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    // Bytes 2 step and 2 step + 1 of each row's 8, values 4 step .. 4 step + 3, go in as the
    // mma's k = 2t, 2t + 1 and 2t + 8, 2t + 9; x words 2 step, 2 step + 1 match them.
    const uint32_t row_lo = step < 2 ? s.w[0].x : s.w[0].y;
    const uint32_t row_hi = step < 2 ? s.w[1].x : s.w[1].y;
    const int b = (2 * step) % 4;
    const uint32_t a[4] = {lut_pair(row_lo, b, lane_entry), lut_pair(row_hi, b, lane_entry),
                           lut_pair(row_lo, b + 1, lane_entry),
                           lut_pair(row_hi, b + 1, lane_entry)};
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      mma_16x8x16<T>(d[mt], a, xw[mt][2 * step], xw[mt][2 * step + 1]);
    }
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] += scale[i / 2] * d[mt][i];
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
// term, and writes y. partial: [tile][warp][4 * kMTiles][32 lanes].
template <typename T, int kMTiles>
__device__ void finish_tiles(const NF4GemvParams& p, const float* partial, int64_t first_tile,
                             int count) {
  constexpr int kRegs = 4 * kMTiles;
  const int warps = blockDim.x / 32;
  const int rows_m = kTileRows * static_cast<int>(p.m);
  for (int o = threadIdx.x; o < count * rows_m; o += blockDim.x) {
    const int r = o % kTileRows;
    const int m = (o / kTileRows) % static_cast<int>(p.m);
    const int slot = o / rows_m;
    const int64_t n = (first_tile + slot) * kTileRows + r;
    if (n >= p.n) continue;
    const int lane = (r % 8) * 4 + (m % 8) / 2;
    const int reg = m % 2 + 2 * (r / 8) + 4 * (m / 8);
    const float* part = partial + (slot * warps * kRegs + reg) * 32 + lane;
    float sum = 0;
    for (int w = 0; w < warps; ++w) sum += part[w * kRegs * 32];
    if (p.lora_a != nullptr) {
      sum += p.lora_b_dtype == DType::kFloat32 ? lora_b_dot<float>(p, m, n)
                                               : lora_b_dot<T>(p, m, n);
    }
    static_cast<T*>(p.y)[m * p.n + n] = convert<T>(sum);
  }
}

// A block barrier that warps may reach from different places in their code (the warps of a
// block end their tiles at different points of the unrolled walk).
__device__ __forceinline__ void block_barrier() { asm volatile("barrier.sync 0;" ::: "memory"); }

// One block per SM; block b owns tiles [b * tiles / grid, (b + 1) * tiles / grid) (a balanced
// split) and warp w the slabs [w * slabs / warps, (w + 1) * slabs / warps) of each (the launch
// gives every warp at least one). A warp walks its (tile, slab) items keeping the next kGemvRing
// slabs' loads in flight, and leaves its sums for each tile in shared memory; each round of
// `tiles_per_round` tiles is then finished by the whole block.
template <typename T, int kMTiles, bool kDouble>
__global__ void __launch_bounds__(kGemvThreads, 1)
nf4_gemv_kernel(const NF4GemvParams p, int tiles_per_round) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float code2[256];
  constexpr int kRegs = 4 * kMTiles;
  const int warps = blockDim.x / 32;
  // The partial sums first, then the table at the next 64 KiB boundary (see lut_pair).
  float* partial = reinterpret_cast<float*>(smem);
  const auto smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t partial_end = smem_base + tiles_per_round * warps * kRegs * 32 * sizeof(float);
  const uint32_t lut_base = (partial_end + kLutBytes - 1) & ~uint32_t{kLutBytes - 1};
  unsigned char* lut = smem + (lut_base - smem_base);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t tile_begin = blockIdx.x * tiles / gridDim.x;
  const int64_t tile_end = (blockIdx.x + 1) * tiles / gridDim.x;
  const auto slabs = static_cast<uint32_t>(p.k / kNF4GemvSlab);
  const uint32_t slab_begin = warp * slabs / warps;
  const uint32_t slab_end = (warp + 1) * slabs / warps;
  const int shift = p.w.log2_blocksize - 6;

  // Fill the ring first so that the loads are in flight while the tables are built.
  GemvSlab<kDouble> ring[kGemvRing];
  GemvCursor load{tile_begin, slab_begin};
  GemvRow load_rows[2];
  tile_rows(load_rows, p, load.tile, g, t, shift);
  const auto load_next = [&](GemvSlab<kDouble>& slot) {
    load_slab(slot, load_rows, load.slab, shift);
    load.advance(slab_begin, slab_end);
    if (load.slab == slab_begin) tile_rows(load_rows, p, load.tile, g, t, shift);
  };
#pragma unroll
  for (int i = 0; i < kGemvRing; ++i) {
    if (load.tile < tile_end) load_next(ring[i]);
  }
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int byte = i / 32;
    reinterpret_cast<uint32_t*>(lut + byte * kLutEntryBytes)[i % 32] =
        pack_pair<T>(kNF4Levels[byte >> 4], kNF4Levels[byte & 15]);
  }
  if constexpr (kDouble) load_code2(p.w, code2);
  __syncthreads();

  const T* x_rows[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int64_t m = g + 8 * mt;
    x_rows[mt] = m < p.m ? static_cast<const T*>(p.x) + m * p.k + 16 * t : nullptr;
  }
  const uint32_t lane_entry = lut_base + lane * 4;
  float acc[kMTiles][4] = {};
  int slot = 0;  // the tile's place in the current round
  GemvCursor at{tile_begin, slab_begin};
  while (at.tile < tile_end) {
#pragma unroll
    for (int i = 0; i < kGemvRing; ++i) {
      if (at.tile >= tile_end) break;
      compute_slab<T, kMTiles, kDouble>(ring[i], acc, x_rows, at.slab, code2, p.w.offset,
                                        lane_entry);
      if (load.tile < tile_end) load_next(ring[i]);
      if (at.slab == slab_end - 1) {
        float* mine = partial + (slot * warps + warp) * kRegs * 32 + lane;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            mine[(4 * mt + j) * 32] = acc[mt][j];
            acc[mt][j] = 0;
          }
        }
        if (++slot == tiles_per_round || at.tile == tile_end - 1) {
          block_barrier();
          finish_tiles<T, kMTiles>(p, partial, at.tile + 1 - slot, slot);
          block_barrier();
          slot = 0;
        }
      }
      at.advance(slab_begin, slab_end);
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

template <typename T, int kMTiles, bool kDouble>
void gemv_launch(const NF4GemvParams& p, cudaStream_t stream) {
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t grid = std::min<int64_t>(tiles, sm_count());
  // Every warp gets at least one slab of each tile.
  const int warps = static_cast<int>(std::min<int64_t>(kGemvWarps, p.k / kNF4GemvSlab));
  const size_t tile_bytes = static_cast<size_t>(warps) * 4 * kMTiles * 32 * sizeof(float);
  // The table sits at a 64 KiB boundary of the shared window: up to 64 KiB of padding before it.
  // Static shared memory (code2) is part of the opt-in limit too.
  const size_t room = max_dynamic_smem() - 2 * kLutBytes - 256 * sizeof(float);
  const int64_t tiles_per_round = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(tiles, grid), static_cast<int64_t>(room / tile_bytes)));
  const size_t smem = 2 * kLutBytes + tiles_per_round * tile_bytes;
  const auto kernel = nf4_gemv_kernel<T, kMTiles, kDouble>;
  prepare_blocks(kernel, kGemvThreads, smem);
  kernel<<<static_cast<unsigned>(grid), warps * 32, smem, stream>>>(
      p, static_cast<int>(tiles_per_round));
}

template <typename T>
void gemv_typed(const NF4GemvParams& p, cudaStream_t stream) {
  if (p.lora_a != nullptr) {
    dispatch_same_or_f32<T>(p.lora_a_dtype, [&](auto a) {
      nf4_lora_a_kernel<T, typename decltype(a)::type>
          <<<static_cast<unsigned>(p.rank), 256, 0, stream>>>(p);
    });
  }
  const bool double_quant = p.w.absmax2 != nullptr;
  if (p.m > 8) {
    double_quant ? gemv_launch<T, 2, true>(p, stream) : gemv_launch<T, 2, false>(p, stream);
  } else {
    double_quant ? gemv_launch<T, 1, true>(p, stream) : gemv_launch<T, 1, false>(p, stream);
  }
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
