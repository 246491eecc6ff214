// The thread model of cuda_emulation.h: the CUDA threads of a block are fibers, run in
// turn by one OS thread until each returns or waits at a barrier.
//
// A fiber switch is a handful of instructions (switch_stack, below), so a kernel's
// block reductions, a warp shuffle per 4-byte word, cost microseconds per block, not the
// system call per switch of swapcontext. Under AddressSanitizer every switch is
// announced to it (__sanitizer_*_switch_fiber), so it checks each fiber's stack as a
// stack; each stack also ends in a guard page.
//
// The order in which threads (and blocks) take turns is a choice: ascending, or with
// MPT_KERNELS_EMULATION_SCHEDULE=reverse (read at each launch) descending. A kernel that
// orders every exchange between threads with a barrier gives the same bits either way;
// one that reads what another thread writes in the same barrier interval (a missing
// __syncthreads, a shared word reused too early) does not, whichever order hides it.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MPT_EMULATION_ASAN 1
#else
#define MPT_EMULATION_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the CUDA emulation switches stacks with x86-64 instructions"
#endif

// switch_stack(&save, next): pushes the callee-saved registers (and the SSE and x87
// control words), stores the stack pointer in *save, loads `next` and pops what was
// pushed there. A new fiber's stack is laid out to "return" into fiber_main.
extern "C" void mpt_emulation_switch_stack(void** save, void* next);
asm(R"(
  .text
  .globl mpt_emulation_switch_stack
  .hidden mpt_emulation_switch_stack
  .type mpt_emulation_switch_stack, @function
mpt_emulation_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mpt_emulation_switch_stack, .-mpt_emulation_switch_stack
)");

namespace mpt_emulation {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  void* sp = nullptr;
  State state = State::kDone;
  ThreadIndex index{};
  uint64_t exchange = 0;  // the value this lane publishes at a warp shuffle
};

struct Block {
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  int current = -1;
  void* scheduler_sp = nullptr;
  std::string error;  // set by a fiber that cannot go on; the launch then fails
  char* stacks = nullptr;
  size_t stack_stride = 0;
  int stacks_mapped = 0;
#if MPT_EMULATION_ASAN
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  void* fake_stack = nullptr;
#endif
};

Block g_block;
cudaError_t g_last_error = cudaSuccess;

// Dynamic shared memory: the running block's buffer, and each kernel's limit once raised.
constexpr int kDefaultDynamicShared = 48 * 1024;
struct FreeAligned {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
};
std::unique_ptr<unsigned char[], FreeAligned> g_dynamic_shared;
std::map<const void*, int> g_dynamic_shared_limits;

// ------------------------------------------------------------------ stacks
// One mapping holds every fiber's stack, each above a page that faults when touched.
void map_stacks(int count) {
  if (count <= g_block.stacks_mapped) return;
  if (g_block.stacks != nullptr) munmap(g_block.stacks, g_block.stack_stride * g_block.stacks_mapped);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  g_block.stack_stride = kStackBytes + page;
  void* memory = mmap(nullptr, g_block.stack_stride * count, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map the fibers' stacks");
  g_block.stacks = static_cast<char*>(memory);
  g_block.stacks_mapped = count;
  for (int t = 0; t < count; ++t) mprotect(g_block.stacks + t * g_block.stack_stride, page, PROT_NONE);
}

char* stack_low(int t) { return g_block.stacks + t * g_block.stack_stride + (g_block.stack_stride - kStackBytes); }

// ------------------------------------------------------------------ switches
void enter_fiber(int t) {
  g_block.current = t;
#if MPT_EMULATION_ASAN
  __sanitizer_start_switch_fiber(&g_block.fake_stack, stack_low(t), kStackBytes);
#endif
  mpt_emulation_switch_stack(&g_block.scheduler_sp, g_block.fibers[t].sp);
#if MPT_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(g_block.fake_stack, nullptr, nullptr);
#endif
  g_block.current = -1;
}

void arrived_in_fiber() {
#if MPT_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_block.scheduler_stack_bottom, &g_block.scheduler_stack_size);
#endif
}

// Back to the scheduler; returns when the scheduler enters this fiber again.
void leave_fiber(bool finished) {
  Fiber& self = g_block.fibers[g_block.current];
#if MPT_EMULATION_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, g_block.scheduler_stack_bottom,
                                 g_block.scheduler_stack_size);
#endif
  mpt_emulation_switch_stack(&self.sp, g_block.scheduler_sp);
#if MPT_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &g_block.scheduler_stack_bottom, &g_block.scheduler_stack_size);
#endif
  (void)finished;
}

[[noreturn]] void fail_fiber(const std::string& what) {
  if (g_block.error.empty()) g_block.error = what;
  for (;;) leave_fiber(false);  // the scheduler abandons the block
}

void fiber_main() {
  arrived_in_fiber();
  try {
    (*g_block.body)();
  } catch (const std::exception& error) {  // nothing may unwind past this frame
    fail_fiber(std::string("a kernel thread threw: ") + error.what());
  }
  g_block.fibers[g_block.current].state = State::kDone;
  leave_fiber(true);
  std::abort();  // a finished fiber is never entered again
}

// The initial stack of fiber t: what switch_stack pops (control words, six registers),
// then fiber_main as the return address, aligned as a call would leave it.
void prepare_fiber(int t) {
#if MPT_EMULATION_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack_low(t), kStackBytes);  // a stack abandoned by a failed block
#endif
  auto* top = reinterpret_cast<uint64_t*>(stack_low(t) + kStackBytes);
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  uint64_t* sp = top;
  *--sp = 0;  // fiber_main's own return address: never used
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  *--sp = static_cast<uint64_t>(control[0]) | (static_cast<uint64_t>(control[1] & 0xffffu) << 32);
  g_block.fibers[t].sp = sp;
  g_block.fibers[t].state = State::kReady;
}

// ------------------------------------------------------------------ one block
std::string describe_waits(int num_threads) {
  std::string s;
  int shown = 0;
  for (int t = 0; t < num_threads && shown < 8; ++t) {
    const State state = g_block.fibers[t].state;
    if (state == State::kDone) continue;
    s += " thread " + std::to_string(t) + (state == State::kAtBlockBarrier ? " at __syncthreads;" : " at a shuffle;");
    ++shown;
  }
  return s;
}

void run_block(uint3 block, dim3 block_dim, dim3 grid_dim, bool reverse) {
  const int num_threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  map_stacks(num_threads);
  g_block.fibers.assign(num_threads, Fiber{});
  for (int t = 0; t < num_threads; ++t) {
    Fiber& f = g_block.fibers[t];
    const unsigned tx = static_cast<unsigned>(t) % block_dim.x;
    const unsigned ty = static_cast<unsigned>(t) / block_dim.x % block_dim.y;
    const unsigned tz = static_cast<unsigned>(t) / (block_dim.x * block_dim.y);
    f.index = ThreadIndex{uint3{tx, ty, tz}, block, block_dim, grid_dim};
    prepare_fiber(t);
  }
  const int num_warps = (num_threads + 31) / 32;
  int done = 0;
  for (;;) {
    bool progressed = false;
    for (int i = 0; i < num_threads; ++i) {
      const int t = reverse ? num_threads - 1 - i : i;
      if (g_block.fibers[t].state != State::kReady) continue;
      enter_fiber(t);
      progressed = true;
      if (!g_block.error.empty()) throw std::runtime_error("CUDA emulation: " + g_block.error);
      if (g_block.fibers[t].state == State::kDone) ++done;
    }
    if (done == num_threads) return;
    // __syncthreads opens once every thread that has not returned waits at it
    int at_block = 0;
    for (const Fiber& f : g_block.fibers) at_block += f.state == State::kAtBlockBarrier;
    if (at_block == num_threads - done) {
      for (Fiber& f : g_block.fibers) {
        if (f.state == State::kAtBlockBarrier) f.state = State::kReady;
      }
      continue;
    }
    // a shuffle opens once all 32 lanes of the warp wait at it (the kernels' masks are full)
    for (int w = 0; w < num_warps; ++w) {
      const int first = 32 * w, last = first + 32 < num_threads ? first + 32 : num_threads;
      int waiting = 0;
      for (int t = first; t < last; ++t) waiting += g_block.fibers[t].state == State::kAtWarpBarrier;
      if (waiting == 0) continue;
      if (waiting == last - first) {
        for (int t = first; t < last; ++t) g_block.fibers[t].state = State::kReady;
        progressed = true;
      }
    }
    if (!progressed) {
      throw std::runtime_error("CUDA emulation: the block's threads wait at barriers that cannot open (block " +
                               std::to_string(block.x) + "):" + describe_waits(num_threads));
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ the header's entry points
const ThreadIndex& current() {
  if (g_block.current < 0) throw std::logic_error("CUDA emulation: a thread index read outside a kernel");
  return g_block.fibers[g_block.current].index;
}

void sync_threads() {
  g_block.fibers[g_block.current].state = State::kAtBlockBarrier;
  leave_fiber(false);
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int source_lane) {
  const int t = g_block.current;
  const int warp_first = t & ~31;
  const int warp_size = static_cast<int>(g_block.fibers.size()) - warp_first < 32
                            ? static_cast<int>(g_block.fibers.size()) - warp_first
                            : 32;
  if (mask != (warp_size == 32 ? 0xffffffffu : (1u << warp_size) - 1u)) {
    fail_fiber("a warp shuffle whose mask is not every lane of the warp");
  }
  Fiber& self = g_block.fibers[t];
  self.exchange = value;
  self.state = State::kAtWarpBarrier;  // every lane has published
  leave_fiber(false);
  const uint64_t out = source_lane < warp_size ? g_block.fibers[warp_first + source_lane].exchange : value;
  self.state = State::kAtWarpBarrier;  // every lane has read before any publishes again
  leave_fiber(false);
  return out;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel,
                     const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (shared_bytes > static_cast<size_t>(dynamic_shared_limit(kernel))) return cudaErrorInvalidValue;
  if (g_block.current >= 0) throw std::logic_error("CUDA emulation: a launch from inside a kernel");
  const char* schedule = std::getenv("MPT_KERNELS_EMULATION_SCHEDULE");
  const bool reverse = schedule != nullptr && std::strcmp(schedule, "reverse") == 0;
  if (schedule != nullptr && !reverse && std::strcmp(schedule, "forward") != 0 && schedule[0] != '\0') {
    throw std::invalid_argument(std::string("MPT_KERNELS_EMULATION_SCHEDULE must be forward or reverse, got ") +
                                schedule);
  }
  g_block.body = &body;
  g_block.error.clear();
  const uint64_t num_blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t i = 0; i < num_blocks; ++i) {
    const uint64_t b = reverse ? num_blocks - 1 - i : i;
    const uint3 index{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / grid.x / grid.y)};
    // a fresh buffer of the exact size per block, so that AddressSanitizer sees its end
    g_dynamic_shared.reset();
    if (shared_bytes > 0) {
      g_dynamic_shared.reset(new (std::align_val_t(16)) unsigned char[shared_bytes]);
      std::memset(g_dynamic_shared.get(), 0xff, shared_bytes);
    }
    run_block(index, block, grid, reverse);
  }
  g_dynamic_shared.reset();
  return cudaSuccess;
}

void* dynamic_shared() {
  if (g_block.current < 0) throw std::logic_error("CUDA emulation: dynamic shared memory read outside a kernel");
  return g_dynamic_shared.get();
}

int dynamic_shared_limit(const void* kernel) {
  const auto found = g_dynamic_shared_limits.find(kernel);
  return found == g_dynamic_shared_limits.end() ? kDefaultDynamicShared : found->second;
}

cudaError_t set_dynamic_shared_limit(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kSharedMemoryOptIn) return cudaErrorInvalidValue;
  g_dynamic_shared_limits[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t error = g_last_error;
  g_last_error = cudaSuccess;
  return error;
}

void set_last_error(cudaError_t error) { g_last_error = error; }

}  // namespace mpt_emulation
