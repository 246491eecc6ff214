// The part of CUDA that csrc/ uses, for the host compiler: csrc/cuda_common.cuh includes
// this file instead of the CUDA headers when MPT_CUDA_EMULATION is defined, so that the
// very kernels of mpt_kernels._C compile with g++ and run on the CPU (build.py).
//
// Every CUDA thread of a block is a fiber with its own stack; one OS thread runs them
// in turn (emulation.cpp). A fiber runs until it waits at __syncthreads() or at a warp
// shuffle, and a barrier opens once every thread it waits for has arrived, so a kernel
// whose threads do not all reach a barrier fails with a message instead of hanging.
// Blocks of a grid run one after another. Shared memory is a static variable (every
// fiber of the block sees the same one); dynamic shared memory is a buffer of the
// launch's exact size per block, filled with 0xff bytes (NaN) first. Launch
// configurations are checked as the GPU checks them, dynamic shared memory against the
// kernel's limit (48 KiB unless raised by cudaFuncSetAttribute, up to sm_90's opt-in
// limit), and reported through cudaGetLastError().
//
// What this cannot see: the GPU's memory model, timing and its approximate math (the
// kernels' fast_exp2 and fast_reciprocal are exact libm operations on the host).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// --------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// --------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(8) float2 {
  float x, y;
};

// --------------------------------------------------------------------------- bit casts and 16-bit floats
inline float __uint_as_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline unsigned __float_as_uint(float f) {
  unsigned bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

struct __half {
  uint16_t bits;
};

struct alignas(4) __half2 {
  __half x, y;
};

inline __half __ushort_as_half(uint16_t bits) { return __half{bits}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }

// GCC's _Float16 converts as IEEE binary16 does, rounding to nearest even.
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof(v));
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, sizeof(v));
  return h;
}

inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // stays a (quiet) NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);                            // to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}

inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

// --------------------------------------------------------------------------- runtime API
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr : int { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// What cudaFuncGetAttributes reports here: the emulation does not know a kernel's static
// shared memory (it reports 0) and keeps the dynamic limit per kernel.
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxDynamicSharedSizeBytes;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};

namespace mpt_emulation {

// ---------------------------------------------------------------- threads (emulation.cpp)
struct ThreadIndex {
  uint3 thread;
  uint3 block;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running fiber's CUDA thread.
const ThreadIndex& current();
// __syncthreads(): waits until every thread of the block that has not returned arrives.
void sync_threads();
// One step of a warp shuffle: publishes `value`, waits for the whole warp, and returns
// the value of lane `source_lane` (this lane's own for an out-of-range one).
uint64_t warp_exchange(unsigned mask, uint64_t value, int source_lane);
// Runs body() once per thread of every block of the grid, each block with
// `shared_bytes` of dynamic shared memory, or returns the error a GPU would report for
// the configuration (of `kernel`, as cudaFuncSetAttribute left it).
cudaError_t run_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel,
                     const std::function<void()>& body);
// The running block's dynamic shared memory (nullptr when the launch asked for none).
void* dynamic_shared();
// The device's opt-in limit of shared memory per block (sm_90's), and a kernel's dynamic
// shared memory limit: 48 KiB until set_dynamic_shared_limit raises it.
constexpr int kSharedMemoryOptIn = 232448;
int dynamic_shared_limit(const void* kernel);
cudaError_t set_dynamic_shared_limit(const void* kernel, int bytes);

cudaError_t take_last_error();
void set_last_error(cudaError_t error);

// ---------------------------------------------------------------- launches
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // the kernel's parameters by value, as CUDA copies them at the launch
    const std::tuple<std::decay_t<Params>...> copied(std::forward<Args>(args)...);
    const cudaError_t error = run_grid(grid, block, shared_bytes, reinterpret_cast<const void*>(kernel),
                                       [&] { std::apply(kernel, copied); });
    if (error != cudaSuccess) set_last_error(error);
  }
};

template <typename... Params>
Launcher<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t) {
  return Launcher<Params...>{kernel, grid, block, shared_bytes};
}

}  // namespace mpt_emulation

#define threadIdx (::mpt_emulation::current().thread)
#define blockIdx (::mpt_emulation::current().block)
#define blockDim (::mpt_emulation::current().block_dim)
#define gridDim (::mpt_emulation::current().grid_dim)

inline void __syncthreads() { ::mpt_emulation::sync_threads(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int source = lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  bits = ::mpt_emulation::warp_exchange(mask, bits, source);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline cudaError_t cudaGetLastError() { return ::mpt_emulation::take_last_error(); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = ::mpt_emulation::kSharedMemoryOptIn;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel* kernel) {
  *attributes = cudaFuncAttributes{0, ::mpt_emulation::dynamic_shared_limit(reinterpret_cast<const void*>(kernel))};
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::mpt_emulation::set_dynamic_shared_limit(reinterpret_cast<const void*>(kernel), value);
}

inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;  // no CUDA runtime: the emulation
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}

inline const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
