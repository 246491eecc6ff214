// Kernels that exercise the CUDA emulation itself (tests/test_cuda_emulation.py): a block
// reduction of csrc/ that must give the exact sum, and kernels that break CUDA's rules,
// which the emulation must report instead of hanging or carrying on.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"

namespace {

// Every thread of every block adds its global index through block_merge (shuffles and
// __syncthreads); thread 0 of each block writes the block's sum.
__global__ void block_sums(int64_t* sums) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t sum = mpt::block_merge(index, mpt::Add{}, int64_t{0});
  if (threadIdx.x == 0) sums[blockIdx.x] = sum;
}

// Thread 0 returns before the barrier that the others wait at: allowed (exited threads
// do not count), and the others go on.
__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  if (threadIdx.x == 1) *out = 7;
}

// Half of the warp shuffles, the other half waits at __syncthreads: no barrier can open.
__global__ void divergent_shuffle(int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    value = __shfl_down_sync(0xffffffffu, value, 1);
  } else {
    __syncthreads();
  }
  *out = value;
}

// A shuffle whose mask leaves lanes out.
__global__ void partial_mask_shuffle(int* out) { *out = __shfl_down_sync(0x0000ffffu, 1, 1); }

__global__ void throwing_kernel(int*) { throw std::runtime_error("thrown inside the kernel"); }

// Each thread publishes token + its index in shared memory and reads its neighbour's:
// with the barrier (kSynced) every read sees this launch's value; without it the read
// races the neighbour's write, so the value depends on the order the threads run in.
template <bool kSynced>
__global__ void read_neighbour(int token, int* out) {
  __shared__ int published[1024];
  published[threadIdx.x] = token + static_cast<int>(threadIdx.x);
  if (kSynced) __syncthreads();
  out[threadIdx.x] = published[(threadIdx.x + 1) % blockDim.x];
}

// Each thread writes its index + 1 to its word of dynamic shared memory and reads its
// neighbour's; thread 0 also reads the last of `num_words` words, which no thread wrote.
// Two copies (kCopy), so that one can be launched before any opt-in and one after.
template <int kCopy>
__global__ void dynamic_shared_words(int num_words, int* out) {
  MPT_DYNAMIC_SHARED(int, words);
  words[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
  __syncthreads();
  out[threadIdx.x] = words[(threadIdx.x + 1) % blockDim.x];
  if (threadIdx.x == 0) out[blockDim.x] = words[num_words - 1];
}

template <typename... Params, typename... Args>
void launch_shared(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
  MPT_LAUNCH_SHARED(kernel, grid, block, shared_bytes, nullptr)(args...);
  mpt::check_cuda(cudaGetLastError(), "the self-test kernel");
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
  launch_shared(kernel, grid, block, 0, args...);
}

int* ints(uintptr_t address) { return reinterpret_cast<int*>(address); }

}  // namespace

PYBIND11_MODULE(_emulation_selftest, m) {
  m.def("block_sums", [](uintptr_t sums, unsigned grid, unsigned block) {
    launch(block_sums, grid, block, reinterpret_cast<int64_t*>(sums));
  });
  m.def("early_exit_then_barrier", [](uintptr_t out) { launch(early_exit_then_barrier, 1, 64, ints(out)); });
  m.def("divergent_shuffle", [](uintptr_t out) { launch(divergent_shuffle, 1, 64, ints(out)); });
  m.def("partial_mask_shuffle", [](uintptr_t out) { launch(partial_mask_shuffle, 1, 32, ints(out)); });
  m.def("read_neighbour", [](bool synced, int token, uintptr_t out, unsigned block) {
    launch(synced ? read_neighbour<true> : read_neighbour<false>, 1, block, token, ints(out));
  });
  m.def("throwing_kernel", [](uintptr_t out) { launch(throwing_kernel, 1, 32, ints(out)); });
  // opt_in: csrc's dynamic_shared_limit first (returns what it granted), on the second
  // copy of the kernel; else the first copy, never opted in (returns -1)
  m.def("dynamic_shared_words", [](bool opt_in, size_t shared_bytes, unsigned block, uintptr_t out) {
    static std::atomic<int> granted[1];
    const int limit = opt_in ? mpt::dynamic_shared_limit(dynamic_shared_words<1>, 0, granted) : -1;
    launch_shared(opt_in ? dynamic_shared_words<1> : dynamic_shared_words<0>, 1, block, shared_bytes,
                  static_cast<int>(shared_bytes / sizeof(int)), ints(out));
    return limit;
  });
  m.def("launch", [](unsigned grid, unsigned block, uintptr_t out) {
    launch(early_exit_then_barrier, grid, block, ints(out));
  });
}
