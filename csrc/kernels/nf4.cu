// NF4 dequantization and the small-M GEMV that reads the packed weight directly.
//
// Dequantize: each thread turns 4 packed bytes (8 values) into one 16-byte store, so a warp reads
// 128 contiguous bytes and writes 512; the 16 levels sit in shared memory (one bank each, so any
// lookup pattern is conflict-free). Values are rounded exactly as bitsandbytes rounds them:
// fp32 level * fp32 absmax, then one rounding to the 16-bit type.
//
// GEMV: tensor cores do the multiply. A warp owns 16 weight rows (the mma's A operand, rows g and
// g + 8 of each lane's quad) and a fixed range of K. A byte becomes the operand register (two
// 16-bit levels) with one PRMT and one shared-memory lookup, and each absmax block's scale is
// applied to the fp32 mma result. So the levels enter rounded to the 16-bit type (bitsandbytes'
// own GEMV also rounds the absmax and the product), a per-weight error of the size of the 16-bit
// rounding of a dequantized weight. The warps of a block split K and add their partial sums
// through shared memory in a fixed order. Within the lanes' share of K the order given to the mma
// is permuted, and x, the B operand, is read with the same permutation, so the products pair up.
// Two layouts:
// - Slab (any M up to 16): each lane reads 8 packed bytes of both rows per 64-value slab, so a
//   quad covers one slab, which lies in one absmax block (blocksize >= 64); x rows are the mma
//   columns. A warp walks its slabs in unrolled groups, loading the next group while it computes
//   one; only when K is not a multiple of the group (kRagged) do the loads carry a bounds
//   predicate.
// - Span (M <= 4, K a multiple of 128): each lane reads 16 bytes of both rows per 128-value span,
//   half the load instructions for the same 8 rows; lanes t = 0, 1 of a quad then hold the
//   span's first block and t = 2, 3 its second, so each x row takes two mma columns, one per
//   block (x zeroed on the other block's k), and each column is scaled by its own block's absmax.
//   On the H200 bench_ops' M = 1 rows went from 1543-1561 GB/s to 1888-1918 (the walk is bound by
//   the L1 pipe: lookups, loads and shuffles); with more rows of x the doubled columns cost more
//   than the halved loads save.
// The number of x rows, the group length and the absmax format are template arguments, so the
// walks have no per-slab branches on them.
#include "kernels/nf4.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
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
// Slab layout: slabs a warp computes as one unrolled group while the next group's loads are in
// flight (two m-tiles hold twice the x and accumulator registers per slab, so half as many).
template <int kMTiles>
constexpr int kGemvGroup = 4 / kMTiles;
// Slabs of a group whose absmax one lane decodes (a half-warp covers one slab's 16 rows).
template <int kMTiles>
constexpr int kScaleSlabs = kGemvGroup<kMTiles> / 2;
// Span layout: the rows of x it takes, and spans per group (one when K is not a multiple).
constexpr int kGemvSpanMaxRows = 4;
constexpr int kGemvGroupSpans = 2;
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

// Where value e of the weight (row-major) goes in the output.
__device__ __forceinline__ int64_t dequant_offset(const NF4DequantParams& p, int64_t e) {
  if (p.out_row_stride == p.cols) return e;
  const int64_t row = e <= UINT32_MAX ? static_cast<uint32_t>(e) / static_cast<uint32_t>(p.cols)
                                      : e / p.cols;
  return row * p.out_row_stride + (e - row * p.cols);
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
      // Streaming stores: the GEMM that reads the weight comes after the whole of it is
      // written. On the H200, bench_ops went from 84.4-84.6% of copy bandwidth with the generic
      // store to 86.5-86.8%.
      store_vec<T, kGroup, true>(static_cast<T*>(p.out) + dequant_offset(p, g * kGroup),
                                 from_acc<T>(v));
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

template <typename B>
__device__ __forceinline__ float lora_b_dot(const NF4GemvParams& p, int64_t m, int64_t n) {
  const B* b = static_cast<const B*>(p.lora_b) + n * p.rank;
  const float* xa = p.lora_xa + m * p.rank;
  float sum = 0;
  for (int64_t j = 0; j < p.rank; ++j) sum += xa[j] * convert<float>(b[j]);
  return sum;
}

// A GEMV block's shared memory: the warps' partial sums of a round of tiles, [tile][warp][kRegs]
// [32 lanes], then the level-pair table at the next 64 KiB boundary (see lut_pair).
struct GemvShared {
  float* partial;
  uint32_t lut_base;
};

// Builds the level-pair table (each entry one pair repeated for the 32 lanes; a thread writes a
// quarter of one) and the second-level code table. The high nibble's level is the same across a
// warp and the low nibble's comes by shuffle (constant memory serializes lanes that read
// different addresses).
template <typename T, int kRegs, bool kDouble>
__device__ __forceinline__ GemvShared gemv_tables(unsigned char* smem, float* code2,
                                                  const NF4View& w, int tiles_per_round) {
  const auto smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t partial_end =
      smem_base + tiles_per_round * (blockDim.x / 32) * kRegs * 32 * sizeof(float);
  const uint32_t lut_base = (partial_end + kLutBytes - 1) & ~uint32_t{kLutBytes - 1};
  unsigned char* lut = smem + (lut_base - smem_base);
  const float lane_level = kNF4Levels[threadIdx.x % 16];
  for (int i = threadIdx.x; i < 4 * 256; i += blockDim.x) {
    const int byte = i / 4;
    const uint32_t pair =
        pack_pair<T>(kNF4Levels[byte >> 4], __shfl_sync(~0u, lane_level, byte & 15));
    uint4* quarter = reinterpret_cast<uint4*>(lut + byte * kLutEntryBytes) + 2 * (i % 4);
    quarter[0] = quarter[1] = make_uint4(pair, pair, pair, pair);
  }
  if constexpr (kDouble) load_code2(w, code2);
  __syncthreads();
  return {reinterpret_cast<float*>(smem), lut_base};
}

// Loads the GEMV's absmax entry `entry` as stored: the fp32 bits, or the double-quantized code
// and its second-level scale.
template <bool kDouble>
__device__ __forceinline__ void load_entry(const NF4View& w, uint32_t entry, uint32_t& stored,
                                           float& scale2) {
  if constexpr (kDouble) {
    stored = __ldg(static_cast<const uint8_t*>(w.absmax) + entry);
    scale2 = __ldg(w.absmax2 + entry / kNF4AbsmaxBlock);
  } else {
    stored = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + entry));
  }
}

// An absmax entry as loaded by load_entry, as the block's scale.
template <bool kDouble>
__device__ __forceinline__ float entry_scale(uint32_t entry, float scale2, const float* code2,
                                             const NF4View& w) {
  return kDouble ? decode_double_quant(code2[entry], scale2, w.offset) : __uint_as_float(entry);
}

// Sums the warps' partials of `count` tiles from `first_tile` in a fixed order, adds the LoRA
// term, and writes y. Weight row r of a tile times x row m sits in lane (r % 8) * 4 + m % 8 / 2,
// register m % 2 + 2 (r / 8) + 4 (m / 8) of a slab-layout warp, and in lane (r % 8) * 4 + m % 4,
// register 2 (m / 4) + r / 8 of a span-layout warp.
template <typename T, int kRegs, bool kSpanLayout>
__device__ void finish_tiles(const NF4GemvParams& p, const float* partial, int64_t first_tile,
                             int count) {
  const int warps = blockDim.x / 32;
  const int rows_m = kTileRows * static_cast<int>(p.m);
  // With LoRA the walk runs beside the kernel that computes lora_xa (see gemv_launch).
  if (p.lora_a != nullptr) wait_for_prior_grid();
  for (int o = threadIdx.x; o < count * rows_m; o += blockDim.x) {
    const int r = o % kTileRows;
    const int m = (o / kTileRows) % static_cast<int>(p.m);
    const int slot = o / rows_m;
    const int64_t n = (first_tile + slot) * kTileRows + r;
    if (n >= p.n) continue;
    const int lane = (r % 8) * 4 + (kSpanLayout ? m % 4 : m % 8 / 2);
    const int reg = kSpanLayout ? 2 * (m / 4) + r / 8 : m % 2 + 2 * (r / 8) + 4 * (m / 8);
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

// Leaves the warp's sums for `tile` (acc, flattened) in its slot of the round and zeroes them;
// after the round's last tile the block finishes it (every warp calls this for every tile).
template <typename T, bool kSpanLayout, int kA, int kB>
__device__ __forceinline__ void end_tile(const NF4GemvParams& p, float* partial,
                                         float (&acc)[kA][kB], int64_t tile, int64_t tile_end,
                                         int tiles_per_round, int& slot) {
  constexpr int kRegs = kA * kB;
  const int warps = blockDim.x / 32;
  float* mine = partial + (slot * warps + threadIdx.x / 32) * kRegs * 32 + threadIdx.x % 32;
#pragma unroll
  for (int a = 0; a < kA; ++a) {
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      mine[(kB * a + b) * 32] = acc[a][b];
      acc[a][b] = 0;
    }
  }
  if (++slot == tiles_per_round || tile + 1 == tile_end) {
    __syncthreads();
    finish_tiles<T, kRegs, kSpanLayout>(p, partial, tile + 1 - slot, slot);
    __syncthreads();
    slot = 0;
  }
}

// The walk of a launch: tiles_per_round tiles are finished per round, and each warp owns the
// groups [warp * groups / warps, (warp + 1) * groups / warps) of every tile.
struct GemvWalk {
  int tiles_per_round;
  uint32_t groups;
};

// What a lane reads of one slab: 8 packed bytes (16 values) of each of its weight rows g and g + 8.
struct SlabWords {
  uint2 row[2];
};

// The absmax entries one lane loads for a group: those of its scale row (lane % 16 of the tile) at
// the group's slabs kScaleSlabs * (lane / 16) + i, as stored (fp32 bits, or the double-quantized
// code and its second-level scale).
template <bool kDouble, int kSlabs>
struct ScaleWords {
  uint32_t entry[kSlabs];
  float scale2[kDouble ? kSlabs : 1];
};

// A lane's rows of one tile, as 32-bit offsets (the launch checks that they fit): its mma rows g
// and g + 8 (in 8-byte units of the packed weight, at slab 0 and the lane's 8 bytes), and its scale
// row, whose absmax entry for slab s is block + ((lo + s) >> shift) (shift: log2 of the slabs per
// absmax block). Rows past the end of the weight read the last row (their results are never
// stored).
struct GemvTile {
  uint32_t packed[2];
  uint32_t block;
  uint32_t lo;
};

__device__ __forceinline__ GemvTile tile_view(const NF4GemvParams& p, int64_t tile, int lane,
                                              int shift) {
  const int64_t slabs = p.k / kNF4GemvSlab;
  const int64_t first_row = tile * kTileRows;
  GemvTile v;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = min(first_row + lane / 4 + 8 * r, p.n - 1);
    v.packed[r] = static_cast<uint32_t>(row * slabs * 4 + lane % 4);
  }
  const int64_t flat = min(first_row + lane % kTileRows, p.n - 1) * slabs;
  v.block = static_cast<uint32_t>(flat >> shift);
  v.lo = static_cast<uint32_t>(flat & ((int64_t{1} << shift) - 1));
  return v;
}

// Slab first + i of the lane's rows. kRagged (K not a multiple of the group): zeros when
// i >= count (past the warp's last slab).
template <bool kRagged>
__device__ __forceinline__ void load_slab(SlabWords& s, const NF4View& w, const GemvTile& v,
                                          uint32_t first, int i, uint32_t count) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint2* row = reinterpret_cast<const uint2*>(w.packed) + (v.packed[r] + 4 * first);
    s.row[r] = !kRagged || i < count ? __ldcs(row + 4 * i) : make_uint2(0, 0);
  }
}

// The lane's absmax entries of the group at slab `first` (kRagged: any value past `end`, where
// the slabs' x is zero).
template <bool kDouble, bool kRagged, int kSlabs>
__device__ __forceinline__ void load_scales(ScaleWords<kDouble, kSlabs>& s, const NF4View& w,
                                            const GemvTile& v, uint32_t first, uint32_t end,
                                            int lane, int shift) {
#pragma unroll
  for (int i = 0; i < kSlabs; ++i) {
    const uint32_t slab = first + kSlabs * (lane / kTileRows) + i;
    const uint32_t entry = v.block + ((v.lo + slab) >> shift);
    s.entry[i] = 0;
    if constexpr (kDouble) s.scale2[i] = 0;
    if (!kRagged || slab < end) {
      load_entry<kDouble>(w, entry, s.entry[i], s.scale2[kDouble ? i : 0]);
    }
  }
}

// acc[mt][i] += scale[i / 2] * the slab's products for m-tile mt: weight rows g (i = 0, 1) and
// g + 8 (i = 2, 3), x rows 8 mt + 2t + (i % 2). x[mt] holds the lane's 16 values of x row
// g + 8 mt (zeros past the last row of x and past the warp's last slab).
template <typename T, int kMTiles>
__device__ __forceinline__ void compute_slab(const SlabWords& s, const uint4 (&x)[kMTiles][2],
                                             const float (&scale)[2], float (&acc)[kMTiles][4],
                                             uint32_t lane_entry) {
  float d[kMTiles][4] = {};
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    // Bytes 2 step and 2 step + 1 of each row's 8, values 4 step .. 4 step + 3, go in as the
    // mma's k = 2t, 2t + 1 and 2t + 8, 2t + 9; x words 2 step, 2 step + 1 match them.
    const uint32_t row_lo = step < 2 ? s.row[0].x : s.row[0].y;
    const uint32_t row_hi = step < 2 ? s.row[1].x : s.row[1].y;
    const int b = (2 * step) % 4;
    const uint32_t a[4] = {lut_pair(row_lo, b, lane_entry), lut_pair(row_hi, b, lane_entry),
                           lut_pair(row_lo, b + 1, lane_entry),
                           lut_pair(row_hi, b + 1, lane_entry)};
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const uint4& xv = x[mt][step / 2];
      const uint32_t b0 = step % 2 == 0 ? xv.x : xv.z;
      const uint32_t b1 = step % 2 == 0 ? xv.y : xv.w;
      mma_16x8x16<T>(d[mt], a, b0, b1);
    }
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] += scale[i / 2] * d[mt][i];
  }
}

// The slab layout (any M, K a multiple of kNF4GemvSlab). Block b owns tiles
// [b * tiles / grid, (b + 1) * tiles / grid) (a balanced split) and warp w the slab groups
// [w * groups / warps, (w + 1) * groups / warps) of each (the launch gives every warp at least
// one). A warp walks its tiles and, in each, its groups: while it computes a group it loads the
// next one (the next tile's first group at the end of a tile), so a group's slabs are always in
// flight. The 16 absmax of a slab are decoded by one half-warp (lane % 16 is the row) and passed
// to the mma lanes by shuffles. A warp leaves its sums for each tile in shared memory; each round
// of tiles is then finished by the block.
template <typename T, int kMTiles, bool kDouble, bool kRagged>
__global__ void __launch_bounds__(kGemvThreads, 1)
nf4_gemv_slab_kernel(const NF4GemvParams p, const GemvWalk walk) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float code2[256];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t tile_begin = blockIdx.x * tiles / gridDim.x;
  const int64_t tile_end = (blockIdx.x + 1) * tiles / gridDim.x;
  const auto slabs = static_cast<uint32_t>(p.k / kNF4GemvSlab);
  constexpr int kSlabs = kGemvGroup<kMTiles>, kScales = kScaleSlabs<kMTiles>;
  const uint32_t slab_begin = kSlabs * (warp * walk.groups / warps);
  const uint32_t slab_end = min(slabs, kSlabs * ((warp + 1) * walk.groups / warps));
  const int shift = p.w.log2_blocksize - 6;

  // The lane's 16 values of each slab of x row g + 8 mt start at x_rows[mt] + 64 slab. Lanes past
  // the last row of x (x_live false) load nothing and hold zeros: they feed only columns of the
  // mma that are never stored, and at M = 1 seven lanes in eight skip the loads.
  const uint4* x_rows[kMTiles];
  bool x_live[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int64_t m = g + 8 * mt;
    x_live[mt] = m < p.m;
    x_rows[mt] = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) +
                                                min(m, p.m - 1) * p.k) + 2 * t;
  }

  // Load the first group first so that its loads are in flight while the tables are built.
  GemvTile view = tile_view(p, tile_begin, lane, shift);
  SlabWords ring[kSlabs];
  ScaleWords<kDouble, kScales> scales;
#pragma unroll
  for (int i = 0; i < kSlabs; ++i) {
    load_slab<kRagged>(ring[i], p.w, view, slab_begin, i, slab_end - slab_begin);
  }
  load_scales<kDouble, kRagged>(scales, p.w, view, slab_begin, slab_end, lane, shift);
  const GemvShared shared =
      gemv_tables<T, 4 * kMTiles, kDouble>(smem, code2, p.w, walk.tiles_per_round);

  const uint32_t lane_entry = shared.lut_base + lane * 4;
  float acc[kMTiles][4] = {};
  // Computes the group at slab `first` (in the ring) and loads the group at slab `next` of
  // `load_view` in its place.
  const auto run_group = [&](uint32_t first, const GemvTile& load_view, uint32_t next) {
    float scale[kScales];
#pragma unroll
    for (int i = 0; i < kScales; ++i) {
      scale[i] = entry_scale<kDouble>(scales.entry[i], scales.scale2[kDouble ? i : 0], code2, p.w);
    }
    load_scales<kDouble, kRagged>(scales, p.w, load_view, next, slab_end, lane, shift);
    const uint4* x_group[kMTiles];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) x_group[mt] = x_rows[mt] + 8 * first;
#pragma unroll
    for (int i = 0; i < kSlabs; ++i) {
      uint4 x[kMTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const bool read = x_live[mt] && (!kRagged || first + i < slab_end);
        x[mt][0] = read ? __ldg(x_group[mt] + 8 * i) : make_uint4(0, 0, 0, 0);
        x[mt][1] = read ? __ldg(x_group[mt] + 8 * i + 1) : make_uint4(0, 0, 0, 0);
      }
      const int source = g + kTileRows * (i / kScales);
      const float row_scale[2] = {__shfl_sync(~0u, scale[i % kScales], source),
                                  __shfl_sync(~0u, scale[i % kScales], source + 8)};
      compute_slab<T, kMTiles>(ring[i], x, row_scale, acc, lane_entry);
      load_slab<kRagged>(ring[i], p.w, load_view, next, i, slab_end - next);
    }
  };
  // The last group of a tile loads the next tile's first group (past the block's last tile it
  // reloads its own first group, which is harmless).
  const uint32_t last = slab_begin + kSlabs * ((slab_end - slab_begin - 1) / kSlabs);
  int slot = 0;  // the tile's place in the current round
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const GemvTile next_view = tile + 1 < tile_end ? tile_view(p, tile + 1, lane, shift) : view;
    for (uint32_t first = slab_begin; first < last; first += kSlabs) {
      run_group(first, view, first + kSlabs);
    }
    run_group(last, next_view, slab_begin);
    view = next_view;
    end_tile<T, false>(p, shared.partial, acc, tile, tile_end, walk.tiles_per_round, slot);
  }
}

// The loads of one group of kSpans spans for one lane: 16 packed bytes (32 values) of each of
// its weight rows g and g + 8 per span, and the absmax entry of its scale row and block (row
// lane % 16 of the tile, the span's block lane / 16) per span as stored (fp32 bits, or the
// double-quantized code and its second-level scale).
template <int kSpans, bool kDouble>
struct SpanLoads {
  uint4 w[kSpans][2];
  uint32_t entry[kSpans];
  float scale2[kDouble ? kSpans : 1];
};

// Where a lane's loads of a group start: its 16 bytes of rows g and g + 8 at the group's first
// span, its 32 values of x there (row g / 2), and the flat index (row * slabs + slab) of its scale
// row's slab there. Rows past the end of the weight read the last row (their results are never
// stored); so do x rows past the last (their loads are skipped).
struct SpanSpot {
  const uint4* w[2];
  const uint4* x;
  uint32_t scale_slab;
};

template <typename T>
__device__ __forceinline__ SpanSpot span_spot(const NF4GemvParams& p, int64_t tile, uint32_t span,
                                              int lane) {
  const int64_t spans = p.k / kNF4GemvSpan;
  const int64_t first_row = tile * kTileRows;
  const int g = lane / 4, t = lane % 4;
  SpanSpot s;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = min(first_row + g + 8 * r, p.n - 1);
    s.w[r] = reinterpret_cast<const uint4*>(p.w.packed) + (row * spans + span) * 4 + t;
  }
  const int64_t m = min(static_cast<int64_t>(g / 2), p.m - 1);
  s.x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.k) + (span * 4 + t) * 4;
  const int64_t scale_row = min(first_row + lane % kTileRows, p.n - 1);
  s.scale_slab = static_cast<uint32_t>((scale_row * spans + span) * 2 + lane / kTileRows);
  return s;
}

// The spot kSpans spans further along the same rows.
template <int kSpans>
__device__ __forceinline__ SpanSpot advance(SpanSpot s) {
  s.w[0] += 4 * kSpans;
  s.w[1] += 4 * kSpans;
  s.x += 16 * kSpans;
  s.scale_slab += 2 * kSpans;
  return s;
}

// Span i of the group at spot s.
template <int kSpans, bool kDouble>
__device__ __forceinline__ void load_span(SpanLoads<kSpans, kDouble>& g, const NF4View& w,
                                          const SpanSpot& s, int i, int shift) {
  g.w[i][0] = __ldcs(s.w[0] + 4 * i);
  g.w[i][1] = __ldcs(s.w[1] + 4 * i);
  load_entry<kDouble>(w, (s.scale_slab + 2 * i) >> shift, g.entry[i], g.scale2[kDouble ? i : 0]);
}

// Component i of a 16-byte word.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// acc[r] += the span's products of weight row g + 8 r with x row t, each of the span's two blocks
// scaled by its absmax: scale[r] for the first block (lanes t = 0, 1 hold it), scale[2 + r] for
// the second. w holds the lane's 16 packed bytes of rows g and g + 8; byte j feeds mma step j / 2
// (k = 2t, 2t + 1 for even j, 2t + 8, 2t + 9 for odd j). Column c of the mma is x row c / 2
// restricted to block c % 2: lane (g, t) reads its 32 values of x row g / 2 (x + x_offset) when
// block g % 2 is the one its t holds (t / 2 == g % 2) and that row exists (live), and holds zeros
// otherwise, so that each column sums one block.
template <typename T>
__device__ __forceinline__ void compute_span(const uint4 (&w)[2], const uint4* x, bool live,
                                             const float (&scale)[4], float (&acc)[1][2],
                                             uint32_t lane_entry) {
  float d[4] = {};
  uint4 xv;
#pragma unroll
  for (int step = 0; step < 8; ++step) {
    const uint32_t row_lo = word_of(w[0], step / 2), row_hi = word_of(w[1], step / 2);
    const int b = 2 * (step % 2);
    const uint32_t a[4] = {lut_pair(row_lo, b, lane_entry), lut_pair(row_hi, b, lane_entry),
                           lut_pair(row_lo, b + 1, lane_entry),
                           lut_pair(row_hi, b + 1, lane_entry)};
    if (step % 2 == 0) xv = live ? __ldg(x + step / 2) : make_uint4(0, 0, 0, 0);
    mma_16x8x16<T>(d, a, step % 2 == 0 ? xv.x : xv.z, step % 2 == 0 ? xv.y : xv.w);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) acc[0][r] += scale[r] * d[2 * r] + scale[2 + r] * d[2 * r + 1];
}

// The span layout (M <= kGemvSpanMaxRows, K a multiple of kNF4GemvSpan). Block b owns tiles
// [b * tiles / grid, (b + 1) * tiles / grid) (a balanced split). A warp walks its tiles and, in
// each, its groups: while it computes a group it loads the next one (the next tile's first group
// at the end of a tile), so a group's loads are always in flight. The absmax of a slab is decoded
// by one lane (row lane % 16, block lane / 16 of the span) and passed to the mma lanes by
// shuffles. A warp leaves its sums for each tile in shared memory; each round of tiles is then
// finished by the block.
template <typename T, int kSpans, bool kDouble>
__global__ void __launch_bounds__(kGemvThreads, 1)
nf4_gemv_span_kernel(const NF4GemvParams p, const GemvWalk walk) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float code2[256];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t tile_begin = blockIdx.x * tiles / gridDim.x;
  const int64_t tile_end = (blockIdx.x + 1) * tiles / gridDim.x;
  const uint32_t group_begin = warp * walk.groups / warps;
  const uint32_t group_end = (warp + 1) * walk.groups / warps;
  const int shift = p.w.log2_blocksize - 6;
  const bool live = g / 2 < p.m && g % 2 == t / 2;

  // Load the first group first so that its loads are in flight while the tables are built.
  SpanSpot spot = span_spot<T>(p, tile_begin, group_begin * kSpans, lane);
  SpanLoads<kSpans, kDouble> loads;
#pragma unroll
  for (int i = 0; i < kSpans; ++i) load_span(loads, p.w, spot, i, shift);
  const GemvShared shared = gemv_tables<T, 2, kDouble>(smem, code2, p.w, walk.tiles_per_round);

  const uint32_t lane_entry = shared.lut_base + lane * 4;
  float acc[1][2] = {};
  int slot = 0;  // the tile's place in the current round
  int64_t tile = tile_begin;
  uint32_t group = group_begin;
  while (true) {
    // Past the block's last tile, the next spot is a harmless reload of its first group.
    const bool tile_done = group + 1 == group_end;
    const SpanSpot next =
        !tile_done ? advance<kSpans>(spot)
                   : span_spot<T>(p, min(tile + 1, tile_end - 1), group_begin * kSpans, lane);
    float scale[kSpans];
#pragma unroll
    for (int i = 0; i < kSpans; ++i) {
      scale[i] = entry_scale<kDouble>(loads.entry[i], loads.scale2[kDouble ? i : 0], code2, p.w);
    }
#pragma unroll
    for (int i = 0; i < kSpans; ++i) {
      const float span_scale[4] = {
          __shfl_sync(~0u, scale[i], g), __shfl_sync(~0u, scale[i], g + 8),
          __shfl_sync(~0u, scale[i], g + 16), __shfl_sync(~0u, scale[i], g + 24)};
      compute_span<T>(loads.w[i], spot.x + 16 * i, live, span_scale, acc, lane_entry);
      load_span(loads, p.w, next, i, shift);
    }
    spot = next;
    if (!tile_done) {
      ++group;
      continue;
    }
    end_tile<T, true>(p, shared.partial, acc, tile, tile_end, walk.tiles_per_round, slot);
    if (++tile == tile_end) break;
    group = group_begin;
  }
}

// lora_xa[m, j] = lora_scale * x[m] . A[j]: one block per adapter row j, all rows of x.
template <typename T, typename A>
__global__ void __launch_bounds__(256) nf4_lora_a_kernel(const NF4GemvParams p) {
  constexpr int kVec = 8;
  allow_dependent_launch();
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

// One block per SM. A tile takes as long as its busiest warp: the fewest warps that give none
// more than ceil(groups / kGemvWarps) groups (every warp gets at least one).
template <int kRegs, typename Kernel>
void gemv_launch(Kernel kernel, const NF4GemvParams& p, int64_t groups, cudaStream_t stream) {
  const int64_t tiles = ceil_div(p.n, kTileRows);
  const int64_t grid = std::min<int64_t>(tiles, sm_count());
  const int warps = static_cast<int>(ceil_div(groups, ceil_div(groups, kGemvWarps)));
  const size_t tile_bytes = static_cast<size_t>(warps) * kRegs * 32 * sizeof(float);
  // The table sits at a 64 KiB boundary of the shared window: up to 64 KiB of padding before it.
  // Static shared memory (code2) is part of the opt-in limit too.
  const size_t room = max_dynamic_smem() - 2 * kLutBytes - 256 * sizeof(float);
  const int64_t tiles_per_round = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(tiles, grid), static_cast<int64_t>(room / tile_bytes)));
  const size_t smem = 2 * kLutBytes + tiles_per_round * tile_bytes;
  prepare_blocks(kernel, kGemvThreads, smem);
  const GemvWalk walk{static_cast<int>(tiles_per_round), static_cast<uint32_t>(groups)};
  if (p.lora_a == nullptr) {
    kernel<<<static_cast<unsigned>(grid), warps * 32, smem, stream>>>(p, walk);
    return;
  }
  // The walk needs lora_xa only when it finishes its tiles: launched as a dependent of the kernel
  // computing it, it streams the weight meanwhile (kernels before that one have all finished).
  const DependentLaunch launch(dim3(static_cast<unsigned>(grid)), dim3(warps * 32), smem, stream);
  cudaLaunchKernelEx(&launch.config, kernel, p, walk);
}

template <typename T>
void gemv_typed(const NF4GemvParams& p, cudaStream_t stream) {
  if (p.lora_a != nullptr) {
    dispatch_same_or_f32<T>(p.lora_a_dtype, [&](auto a) {
      nf4_lora_a_kernel<T, typename decltype(a)::type>
          <<<static_cast<unsigned>(p.rank), 256, 0, stream>>>(p);
    });
  }
  dispatch_flag(p.w.absmax2 != nullptr, [&](auto double_quant) {
    if (p.m <= kGemvSpanMaxRows && p.k % kNF4GemvSpan == 0) {
      dispatch_flag(p.k % (kGemvGroupSpans * kNF4GemvSpan) == 0, [&](auto full) {
        constexpr int kSpans = full ? kGemvGroupSpans : 1;
        gemv_launch<2>(nf4_gemv_span_kernel<T, kSpans, double_quant>, p,
                       p.k / kNF4GemvSpan / kSpans, stream);
      });
      return;
    }
    dispatch_flag(p.m > 8, [&](auto two_m_tiles) {
      constexpr int kMTiles = two_m_tiles ? 2 : 1;
      dispatch_flag(p.k % (kGemvGroup<kMTiles> * kNF4GemvSlab) != 0, [&](auto ragged) {
        gemv_launch<4 * kMTiles>(nf4_gemv_slab_kernel<T, kMTiles, double_quant, ragged>, p,
                                 ceil_div(p.k / kNF4GemvSlab, kGemvGroup<kMTiles>), stream);
      });
    });
  });
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
