// CUDA-only helpers shared by the kernels: error checks, dtypes, vector loads and
// stores, deterministic block reductions, and the (row, column-vector) walk.
#pragma once

#if defined(MPT_CUDA_EMULATION)
// tests/cuda_emulation: the same kernels compiled by the host compiler and run on the
// CPU, one fiber per CUDA thread, so that CI runs them without a GPU.
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace mpt {

// --------------------------------------------------------------------------- errors
// Every CUDA call and launch is checked; a failure becomes std::runtime_error, which
// pybind11 raises as RuntimeError with CUDA's own text.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("mpt_kernels._C: ") + what + " failed: " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

#define MPT_CUDA_CHECK(call) ::mpt::check_cuda((call), #call)
#define MPT_CHECK_LAUNCH(kernel) ::mpt::check_cuda(cudaGetLastError(), "launch of " kernel)

// MPT_LAUNCH_SHARED(kernel, grid, block, shared_bytes, stream)(arguments...) is
// kernel<<<grid, block, shared_bytes, stream>>>(arguments...), written so that the
// emulation can launch it too; MPT_LAUNCH is the same without dynamic shared memory.
// MPT_DYNAMIC_SHARED(T, name) declares `name`, the block's dynamic shared memory as T[].
#if defined(MPT_CUDA_EMULATION)
#define MPT_LAUNCH_SHARED(kernel, grid, block, shared_bytes, stream) \
  ::mpt_emulation::launch(kernel, grid, block, shared_bytes, stream)
#define MPT_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::mpt_emulation::dynamic_shared())
#else
#define MPT_LAUNCH_SHARED(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#define MPT_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
#define MPT_LAUNCH(kernel, grid, block, stream) MPT_LAUNCH_SHARED(kernel, grid, block, 0, stream)

// The static cudart keeps its own current device, separate from torch's: set it for
// every entry point, so that tensors on cuda:1 run on cuda:1.
inline cudaStream_t enter_device(const Launch& launch) {
  (void)cudaGetLastError();  // an earlier call's failure, already raised: not this call's
  MPT_CUDA_CHECK(cudaSetDevice(launch.device));
  return reinterpret_cast<cudaStream_t>(launch.stream);
}

// The most dynamic shared memory a block of `kernel` may have on the current device,
// `device`: the device's opt-in limit less the kernel's static shared memory. CUDA asks
// for the opt-in (cudaFuncSetAttribute) before a launch may use more than 48 KiB; it is
// made once per kernel and device and remembered in `granted` (one entry per device, 0
// while not yet asked; a device past the entries asks at every launch).
template <typename Kernel, int kDevices>
int dynamic_shared_limit(Kernel* kernel, int device, std::atomic<int> (&granted)[kDevices]) {
  const bool cached = device >= 0 && device < kDevices;
  if (cached) {
    const int known = granted[device].load(std::memory_order_relaxed);
    if (known > 0) return known - 1;
  }
  int opt_in = 0;
  MPT_CUDA_CHECK(cudaDeviceGetAttribute(&opt_in, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};
  MPT_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int limit = opt_in - static_cast<int>(attributes.sharedSizeBytes);
  MPT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  if (cached) granted[device].store(limit + 1, std::memory_order_relaxed);
  return limit;
}

// --------------------------------------------------------------------------- dtypes
// Each tag names the storage type of one DType and converts it to float32 (and back).
struct Float32 {
  using storage = float;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static bool positive(float v) { return v > 0.5f; }
};

struct Float16 {
  using storage = uint16_t;
  __device__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ static bool positive(uint16_t bits) { return to_float(bits) > 0.5f; }
};

struct BFloat16 {
  using storage = uint16_t;
  __device__ static float to_float(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
  __device__ static uint16_t from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ static bool positive(uint16_t bits) { return to_float(bits) > 0.5f; }
};

struct UInt8 {  // also bool (bytes 0/1)
  using storage = uint8_t;
  __device__ static bool positive(uint8_t v) { return v > 0; }  // v > 0.5 for an integer
};

struct Float64 {
  using storage = double;
  __device__ static bool positive(double v) { return v > 0.5; }  // compared in float64, as torch does
};

// Calls f(Tag{}) with the dtype tag of a logits dtype code.
template <typename F>
void dispatch_logits_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(Float32{}); break;
    case kFloat16: f(Float16{}); break;
    case kBFloat16: f(BFloat16{}); break;
    default:
      throw std::invalid_argument("logits dtype code " + std::to_string(dtype) +
                                  " is not float32, float16 or bfloat16");
  }
}

// --------------------------------------------------------------------------- vector memory access
template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// Elements per 16-byte access, at most VEC.
template <typename S, int VEC>
struct PackOf {
  static constexpr int kSize = (16 / static_cast<int>(sizeof(S))) < VEC ? (16 / static_cast<int>(sizeof(S))) : VEC;
};

// Whether VEC-element slots starting at multiples of VEC in every row are aligned for
// PackOf<S, VEC> accesses: the base address and the row stride (in bytes) must be.
template <typename S, int VEC>
inline bool slots_aligned(uintptr_t address, int64_t row_stride) {
  constexpr uintptr_t bytes = sizeof(S) * PackOf<S, VEC>::kSize;
  return address % bytes == 0 && (static_cast<uint64_t>(row_stride) * sizeof(S)) % bytes == 0;
}

template <int VEC, typename S>
__device__ __forceinline__ void load_pack(const S* p, S (&out)[VEC]) {
  constexpr int P = PackOf<S, VEC>::kSize;
#pragma unroll
  for (int k = 0; k < VEC; k += P) {
    const Pack<S, P> pack = *reinterpret_cast<const Pack<S, P>*>(p + k);
#pragma unroll
    for (int e = 0; e < P; ++e) out[k + e] = pack.v[e];
  }
}

template <int VEC, typename S>
__device__ __forceinline__ void store_pack(S* p, const S (&in)[VEC]) {
  constexpr int P = PackOf<S, VEC>::kSize;
#pragma unroll
  for (int k = 0; k < VEC; k += P) {
    Pack<S, P> pack;
#pragma unroll
    for (int e = 0; e < P; ++e) pack.v[e] = in[k + e];
    *reinterpret_cast<Pack<S, P>*>(p + k) = pack;
  }
}

// The VEC values of row columns [col0, col0 + VEC) as float32; columns outside [lo, hi)
// read 0. Full slots use 16-byte loads when `aligned`, the rest (ends, misaligned)
// scalar loads.
template <typename D, int VEC>
__device__ __forceinline__ void load_slot(const typename D::storage* row, int64_t col0, int64_t lo, int64_t hi,
                                          bool aligned, float* out) {
  using S = typename D::storage;
  if (aligned && col0 >= lo && col0 + VEC <= hi) {
    S raw[VEC];
    load_pack<VEC>(row + col0, raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = D::to_float(raw[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = col0 + e >= lo && col0 + e < hi ? D::to_float(row[col0 + e]) : 0.0f;
  }
}

// Stores `values` (float32) to the row's columns [col0, col0 + VEC) that lie in [lo, hi).
template <typename D, int VEC>
__device__ __forceinline__ void store_slot(typename D::storage* row, int64_t col0, int64_t lo, int64_t hi,
                                           bool aligned, const float* values) {
  using S = typename D::storage;
  if (aligned && col0 >= lo && col0 + VEC <= hi) {
    S raw[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) raw[e] = D::from_float(values[e]);
    store_pack<VEC>(row + col0, raw);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (col0 + e >= lo && col0 + e < hi) row[col0 + e] = D::from_float(values[e]);
    }
  }
}

// The same with no lower bound: the columns of [col0, col0 + VEC) below `cols`.
template <typename D, int VEC>
__device__ __forceinline__ void load_slot(const typename D::storage* row, int64_t col0, int64_t cols, bool aligned,
                                          float* out) {
  load_slot<D, VEC>(row, col0, col0, cols, aligned, out);
}

template <typename D, int VEC>
__device__ __forceinline__ void store_slot(typename D::storage* row, int64_t col0, int64_t cols, bool aligned,
                                           const float* values) {
  store_slot<D, VEC>(row, col0, col0, cols, aligned, values);
}

// --------------------------------------------------------------------------- block reductions
template <typename T>
__device__ __forceinline__ T shuffle_down(const T& value, int offset) {
  static_assert(sizeof(T) % sizeof(int) == 0, "shuffled structs are made of 4-byte words");
  constexpr int kWords = sizeof(T) / sizeof(int);
  int words[kWords];
  memcpy(words, &value, sizeof(T));
#pragma unroll
  for (int k = 0; k < kWords; ++k) words[k] = __shfl_down_sync(0xffffffffu, words[k], offset);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

template <typename T, typename Merge>
__device__ __forceinline__ T warp_merge(T value, Merge merge) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = merge(value, shuffle_down(value, offset));
  return value;  // complete in lane 0
}

// Merges one value per thread over the block in a fixed tree (shuffles within each warp,
// then the warps' results in warp 0), so the result does not depend on timing: no
// atomics. blockDim.x must be a multiple of 32. Every thread gets the result.
template <typename T, typename Merge>
__device__ T block_merge(T value, Merge merge, T empty) {
  __shared__ T warp_results[32];
  __shared__ T block_result;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  value = warp_merge(value, merge);
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_merge(lane < num_warps ? warp_results[lane] : empty, merge);
    if (lane == 0) block_result = value;
  }
  __syncthreads();
  return block_result;
}

struct Add {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// --------------------------------------------------------------------------- grid walk
// Grid-stride walk over the units (row, column vector) of an N x C matrix, stepping
// without a 64-bit division per unit.
struct UnitWalk {
  int64_t row, vec, vecs_per_row, step_rows, step_vecs;

  __device__ UnitWalk(int64_t vecs_per_row_) : vecs_per_row(vecs_per_row_) {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    row = first / vecs_per_row;
    vec = first % vecs_per_row;
    step_rows = step / vecs_per_row;
    step_vecs = step % vecs_per_row;
  }

  __device__ void advance() {
    row += step_rows;
    vec += step_vecs;
    if (vec >= vecs_per_row) {
      vec -= vecs_per_row;
      ++row;
    }
  }
};

constexpr int kElementwiseThreads = 256;

// Blocks for an elementwise walk over `units`: depends only on the problem size, so
// the per-block partials (and the sum) are the same on every device.
inline unsigned elementwise_blocks(int64_t units) {
  const int64_t blocks = (units + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(blocks < kMultilabelMaxBlocks ? blocks : kMultilabelMaxBlocks);
}

// Kernels both families share (common_kernels.cu).
// Sums float32 partials in a fixed order and writes the reduced loss (dtype: the
// logits'), divided by *count when count is given (0 counted rows give 0), else by
// divisor when divisor > 0.
void launch_finish_sum(int dtype, const float* partials, int64_t n, const int64_t* count, float divisor,
                       void* out, cudaStream_t stream);

}  // namespace mpt
