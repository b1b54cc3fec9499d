// Host emulation of the CUDA execution model: kernels.cu compiled by a host C++ compiler.
//
// setup.py builds scorefast._cuda_host from the CUDA sources with
//     c++ -x c++ -include host_emulation.h kernels.cu   (+ module.cpp, the same bindings)
// so the kernels, their launchers and the pybind11 module that a GPU runs are the code under
// test on a machine without one (SCOREFAST_CUDA_EMULATE=1, see scorefast/backends/cuda_backend.py).
//
// What it provides, for a host compiler that sees no __CUDACC__:
// * threadIdx / blockIdx / blockDim / gridDim, __shared__ (one block runs at a time, so a
//   function-local static is the block's shared memory) and __syncthreads();
// * SF_LAUNCH(kernel, grid, block, stream, args...): checks the launch configuration as the
//   driver does (cudaErrorInvalidConfiguration, read back by cudaGetLastError()), then runs the
//   grid one block at a time.  Every CUDA thread of a block is a fiber on the calling thread: it
//   runs until it exits or reaches a barrier (__syncthreads() or a warp shuffle); a pass runs every
//   runnable thread to its next barrier, then the scheduler releases the warp shuffles whose member
//   lanes have all arrived, or, when every live thread waits at __syncthreads(), the block barrier.
//   Threads that have exited do not hold __syncthreads() (as on sm_70+).  Blocks run forwards on one
//   launch and backwards on the next, threads forwards and backwards on alternate passes: a GPU
//   gives no order, so code that needs one fails here too.  A state that can never resume (a shuffle
//   whose lanes wait at __syncthreads(), a barrier some threads never reach) is a deadlock: it aborts.
// * __shfl_sync / __shfl_up_sync / __shfl_down_sync / __shfl_xor_sync with the lane semantics of
//   PTX shfl.sync (idx / up / down / bfly): lane = linear thread index % 32; `width` splits the warp
//   into segments; a source lane outside the caller's segment (up: below it, down and bfly: above it,
//   idx: wrapped into it) gives the caller's own value.  Undefined uses abort: a mask without the
//   caller's lane, a member lane that exited or never arrives, members disagreeing on the mask or
//   the shuffle, a source lane outside the mask, a width that is not a power of two <= 32.
// * atomicCAS on 32- and 64-bit words (one thread runs at a time, so a plain compare-and-store).
// * fp16/bf16 conversions and fmaf/logf/sqrtf/sinf/cosf come from the CUDA headers' host code and
//   the C library: the same roundings as the device, and libm's last-ulp differences from the
//   device's precise sinf/cosf/logf (the noise contract's tolerance covers those).
//
// Fibers switch with a few instructions on x86-64 (the callee-saved registers and the stack
// pointer; all fibers share one floating-point environment) and with ucontext elsewhere (or when
// SCOREFAST_EMULATION_UCONTEXT is defined).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(SCOREFAST_EMULATION_UCONTEXT)
#include <ucontext.h>
#endif

#if !defined(SCOREFAST_CUDA_HOST_EMULATION)
#define SCOREFAST_CUDA_HOST_EMULATION 1  // module.cpp's switch to the _cuda_host module name
#endif

namespace scorefast_emulation {

// Per-thread stacks: the kernels' frames are small (a few hundred bytes, libm calls included); the
// canary at the bottom of each catches an overflow.  Each stack's top is offset by a different
// number of cache lines so that the 256+ stacks do not all map to the same cache sets.
constexpr std::size_t kStackBytes = 16 * 1024;
constexpr std::size_t kStackColors = 61;
constexpr std::uint64_t kCanary = 0x5CF0CA1AB1E5CAFEull;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7fffffffu;
constexpr unsigned kMaxGridYZ = 65535u;

#if defined(__x86_64__) && !defined(SCOREFAST_EMULATION_UCONTEXT)
struct Context {
  void* sp = nullptr;
};
extern "C" void scorefast_emulation_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers on the current stack, stores its pointer in *save_sp, loads
// load_sp and restores the registers saved there (or the initial frame of make_context).
asm(R"(
    .text
    .p2align 4
    .type scorefast_emulation_switch, @function
scorefast_emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size scorefast_emulation_switch, .-scorefast_emulation_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

inline void make_context(Context& ctx, char* stack, std::size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<std::uint64_t*>((reinterpret_cast<std::uintptr_t>(stack + bytes)) & ~std::uintptr_t{15});
  *--sp = 0;                                         // entry's return address: it never returns
  *--sp = reinterpret_cast<std::uint64_t>(entry);    // popped by the switch's ret
  for (int r = 0; r < 6; ++r) *--sp = 0;             // rbp rbx r12 r13 r14 r15
  ctx.sp = sp;
}

inline void switch_context(Context& from, Context& to) { scorefast_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

inline void make_context(Context& ctx, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Builtins {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};

// What a fiber waits for when it hands control back to the scheduler.
enum class Wait : unsigned char { kRunnable, kBlock, kWarp, kDone };

// shfl.sync modes (PTX): idx reads lane b, up lane - b, down lane + b, bfly lane ^ b.
enum class ShuffleMode : int { kIdx, kUp, kDown, kBfly };

// A lane's part in a warp shuffle: what it offers and asks, and (after the release) what it got.
struct Shuffle {
  unsigned mask = 0;
  ShuffleMode mode = ShuffleMode::kIdx;
  int b = 0;
  int width = 32;
  std::uint64_t value = 0;
  std::uint64_t result = 0;
};

constexpr unsigned kWarpSize = 32;

// One block's fibers, on the thread that launched the kernel.
struct Block {
  std::vector<Context> fibers;
  std::vector<Wait> wait;
  std::vector<Shuffle> shuffle;
  std::vector<char> stacks;
  Context scheduler;
  unsigned current = 0;
  void (*body)(void*) = nullptr;  // the running kernel; null between launches
  void* args = nullptr;
};

// One launch at a time in the process (launch() holds launch_mutex): plain globals, no TLS lookups
// on every threadIdx read.
inline Builtins builtins;
inline Block block;
inline thread_local cudaError_t last_error = cudaSuccess;  // per host thread, as in the runtime
inline std::mutex launch_mutex;
inline thread_local bool launching_here = false;  // this host thread is running a grid
inline unsigned long long launches = 0;  // under launch_mutex

inline cudaError_t take_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "scorefast CUDA host emulation: %s\n", what);
  std::abort();
}

// The first frame of every fiber: run the kernel body for the current thread, then hand back.
[[noreturn]] inline void fiber_entry() {
  Block& blk = block;
  blk.body(blk.args);
  blk.wait[blk.current] = Wait::kDone;
  switch_context(blk.fibers[blk.current], blk.scheduler);
  fail("a finished CUDA thread was resumed");
}

// Hands control back until the scheduler releases what this thread waits for.
inline void wait_for(Wait what, const char* where) {
  Block& blk = block;
  if (blk.body == nullptr) fail(where);
  blk.wait[blk.current] = what;
  switch_context(blk.fibers[blk.current], blk.scheduler);
}

inline void syncthreads() { wait_for(Wait::kBlock, "__syncthreads() outside a kernel"); }

// The source lane of `lane` in a shuffle, or `lane` itself where PTX returns the caller's own value.
inline unsigned shuffle_source(const Shuffle& s, unsigned lane) {
  const unsigned seg_start = lane & ~static_cast<unsigned>(s.width - 1);
  const unsigned seg_end = seg_start + static_cast<unsigned>(s.width) - 1;
  const int b = s.b;
  switch (s.mode) {
    case ShuffleMode::kIdx:
      return seg_start + (static_cast<unsigned>(b) & static_cast<unsigned>(s.width - 1));
    case ShuffleMode::kUp:
      return static_cast<int>(lane) - b < static_cast<int>(seg_start) ? lane : lane - static_cast<unsigned>(b);
    case ShuffleMode::kDown:
      return lane + static_cast<unsigned>(b) > seg_end ? lane : lane + static_cast<unsigned>(b);
    case ShuffleMode::kBfly:
    default: {
      const unsigned j = lane ^ (static_cast<unsigned>(b) & 31u);
      return j > seg_end ? lane : j;
    }
  }
}

// Releases every warp shuffle whose member lanes have all arrived: each gets its source's value.
inline bool release_shuffles(unsigned threads) {
  Block& blk = block;
  bool released = false;
  for (unsigned w0 = 0; w0 < threads; w0 += kWarpSize) {
    for (unsigned t = w0; t < threads && t < w0 + kWarpSize; ++t) {
      if (blk.wait[t] != Wait::kWarp) continue;
      const Shuffle& first = blk.shuffle[t];
      bool ready = true;
      for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        if (!((first.mask >> lane) & 1u)) continue;
        const unsigned m = w0 + lane;
        if (m >= threads) fail("a shuffle's mask names a lane past the end of the block");
        if (blk.wait[m] == Wait::kDone) fail("a shuffle's mask names a thread that has exited");
        if (blk.wait[m] != Wait::kWarp) {
          ready = false;  // still running, or at __syncthreads(): a deadlock unless it arrives
          continue;
        }
        const Shuffle& other = blk.shuffle[m];
        if (other.mask != first.mask || other.mode != first.mode || other.width != first.width) {
          fail("the lanes of a shuffle disagree on its mask, mode or width");
        }
      }
      if (!ready) continue;
      for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        if (!((first.mask >> lane) & 1u)) continue;
        Shuffle& s = blk.shuffle[w0 + lane];
        const unsigned src = shuffle_source(s, lane);
        if (!((first.mask >> src) & 1u)) fail("a shuffle reads a lane outside its mask");
        s.result = blk.shuffle[w0 + src].value;
      }
      for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        if ((first.mask >> lane) & 1u) blk.wait[w0 + lane] = Wait::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

template <typename T>
T shfl_sync(unsigned mask, T var, int b, int width, ShuffleMode mode) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffles move at most 8 bytes");
  static_assert(std::is_trivially_copyable<T>::value, "shuffles move trivially copyable values");
  Block& blk = block;
  if (blk.body == nullptr) fail("a warp shuffle outside a kernel");
  const unsigned lane = blk.current % kWarpSize;
  if (!((mask >> lane) & 1u)) fail("a shuffle's mask does not name the calling lane");
  if (width < 1 || width > static_cast<int>(kWarpSize) || (width & (width - 1)) != 0) {
    fail("a shuffle's width is not a power of two in [1, 32]");
  }
  Shuffle& s = blk.shuffle[blk.current];
  s.mask = mask;
  s.mode = mode;
  s.b = b;
  s.width = width;
  s.value = 0;
  std::memcpy(&s.value, &var, sizeof(T));
  wait_for(Wait::kWarp, "a warp shuffle outside a kernel");
  T out;
  std::memcpy(&out, &blk.shuffle[blk.current].result, sizeof(T));
  return out;
}

inline std::uint64_t* canary_of(Block& blk, unsigned t) {
  return reinterpret_cast<std::uint64_t*>(blk.stacks.data() + static_cast<std::size_t>(t) * kStackBytes);
}

// Runs the block at builtins.block_idx: passes over the runnable threads, releasing barriers
// between passes, until every thread has exited.
inline void run_block(unsigned threads) {
  Block& blk = block;
  for (unsigned t = 0; t < threads; ++t) {
    *canary_of(blk, t) = kCanary;
    const std::size_t color = (t % kStackColors) * 64;
    make_context(blk.fibers[t], blk.stacks.data() + static_cast<std::size_t>(t) * kStackBytes, kStackBytes - color,
                 &fiber_entry);
    blk.wait[t] = Wait::kRunnable;
  }
  const dim3 dim = builtins.block_dim;
  const bool flat = dim.y == 1 && dim.z == 1;
  // Passes alternate the order in which threads run (forwards, then backwards), so a kernel whose
  // result depends on the order of threads between two barriers (a race on a GPU) shows it.
  for (unsigned pass = 0;; ++pass) {
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = pass % 2 == 0 ? i : threads - 1 - i;
      if (blk.wait[t] != Wait::kRunnable) continue;
      blk.current = t;
      builtins.thread_idx = flat ? uint3{t, 0, 0} : uint3{t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y)};
      switch_context(blk.scheduler, blk.fibers[t]);
    }
    // every live thread now waits at a barrier: shuffles first, then the block barrier
    if (release_shuffles(threads)) continue;
    unsigned live = 0, at_block = 0;
    for (unsigned t = 0; t < threads; ++t) {
      live += blk.wait[t] != Wait::kDone;
      at_block += blk.wait[t] == Wait::kBlock;
    }
    if (live == 0) break;
    if (at_block != live) fail("deadlock: a warp shuffle waits for lanes that wait at __syncthreads()");
    for (unsigned t = 0; t < threads; ++t) {
      if (blk.wait[t] == Wait::kBlock) blk.wait[t] = Wait::kRunnable;
    }
  }
  for (unsigned t = 0; t < threads; ++t) {
    if (*canary_of(blk, t) != kCanary) fail("a CUDA thread overflowed its emulated stack");
  }
}

template <typename Params>
void run_kernel(void* erased) {
  auto* call = static_cast<Params*>(erased);
  std::apply(call->first, call->second);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 threads_per_block, cudaStream_t /*stream*/, A&&... args) {
  const unsigned long long threads =
      1ull * threads_per_block.x * threads_per_block.y * threads_per_block.z;
  const bool valid = threads >= 1 && threads <= kMaxThreadsPerBlock && grid.x >= 1 && grid.y >= 1 &&
                     grid.z >= 1 && grid.x <= kMaxGridX && grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ;
  if (!valid) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (launching_here) fail("a kernel launched from a kernel");
  const std::lock_guard<std::mutex> lock(launch_mutex);
  launching_here = true;
  using Params = std::pair<void (*)(P...), std::tuple<P...>>;
  Params call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  Block& blk = block;
  blk.fibers.resize(threads);
  blk.wait.resize(threads);
  blk.shuffle.resize(threads);
  if (blk.stacks.size() < threads * kStackBytes) blk.stacks.resize(threads * kStackBytes);
  blk.body = &run_kernel<Params>;
  blk.args = &call;
  builtins.block_dim = threads_per_block;
  builtins.grid_dim = grid;
  // A GPU runs blocks in no fixed order: every other launch runs the grid backwards, so a kernel
  // that depends on block order (reads what another block of the same launch writes) shows it.
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const bool backwards = (launches++ % 2) == 1;
  for (unsigned long long i = 0; i < blocks; ++i) {
    const unsigned long long k = backwards ? blocks - 1 - i : i;
    builtins.block_idx = uint3{static_cast<unsigned>(k % grid.x), static_cast<unsigned>((k / grid.x) % grid.y),
                               static_cast<unsigned>(k / (1ull * grid.x * grid.y))};
    run_block(static_cast<unsigned>(threads));
  }
  blk.body = nullptr;
  blk.args = nullptr;
  launching_here = false;
}

}  // namespace scorefast_emulation

#define threadIdx (::scorefast_emulation::builtins.thread_idx)
#define blockIdx (::scorefast_emulation::builtins.block_idx)
#define blockDim (::scorefast_emulation::builtins.block_dim)
#define gridDim (::scorefast_emulation::builtins.grid_dim)
#if !defined(__launch_bounds__)
#define __launch_bounds__(...)
#endif
#undef __shared__
#define __shared__ static
#define __syncthreads() ::scorefast_emulation::syncthreads()
#define cudaGetLastError() ::scorefast_emulation::take_last_error()
#define SF_LAUNCH(kernel, grid, block, stream, ...) \
  ::scorefast_emulation::launch(kernel, grid, block, stream, __VA_ARGS__)

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::scorefast_emulation::shfl_sync(mask, var, src_lane, width, ::scorefast_emulation::ShuffleMode::kIdx);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::scorefast_emulation::shfl_sync(mask, var, static_cast<int>(delta), width,
                                          ::scorefast_emulation::ShuffleMode::kUp);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::scorefast_emulation::shfl_sync(mask, var, static_cast<int>(delta), width,
                                          ::scorefast_emulation::ShuffleMode::kDown);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::scorefast_emulation::shfl_sync(mask, var, lane_mask, width, ::scorefast_emulation::ShuffleMode::kBfly);
}
// One thread runs at a time: a compare-and-store is atomic.
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long val) {
  const unsigned long long old = *address;
  if (old == compare) *address = val;
  return old;
}
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned val) {
  const unsigned old = *address;
  if (old == compare) *address = val;
  return old;
}
inline int atomicCAS(int* address, int compare, int val) {
  const int old = *address;
  if (old == compare) *address = val;
  return old;
}
