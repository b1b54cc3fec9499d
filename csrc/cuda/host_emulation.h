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
//   runs until it exits or reaches __syncthreads(); when every live thread of the block waits
//   there, they all resume.  Threads that have exited do not hold a barrier (as on sm_70+).
//   Blocks run forwards on one launch and backwards on the next, threads forwards and backwards
//   on alternate rounds: a GPU gives no order, so code that needs one fails here too.
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
#include <mutex>
#include <tuple>
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

// One block's fibers, on the thread that launched the kernel.
struct Block {
  std::vector<Context> fibers;
  std::vector<char> done;
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
  blk.done[blk.current] = 1;
  switch_context(blk.fibers[blk.current], blk.scheduler);
  fail("a finished CUDA thread was resumed");
}

inline void syncthreads() {
  Block& blk = block;
  if (blk.body == nullptr) fail("__syncthreads() outside a kernel");
  switch_context(blk.fibers[blk.current], blk.scheduler);  // resumed once every live thread waits
}

inline std::uint64_t* canary_of(Block& blk, unsigned t) {
  return reinterpret_cast<std::uint64_t*>(blk.stacks.data() + static_cast<std::size_t>(t) * kStackBytes);
}

// Runs the block at builtins.block_idx: rounds over the live threads until every one has exited.
inline void run_block(unsigned threads) {
  Block& blk = block;
  for (unsigned t = 0; t < threads; ++t) {
    *canary_of(blk, t) = kCanary;
    const std::size_t color = (t % kStackColors) * 64;
    make_context(blk.fibers[t], blk.stacks.data() + static_cast<std::size_t>(t) * kStackBytes, kStackBytes - color,
                 &fiber_entry);
    blk.done[t] = 0;
  }
  const dim3 dim = builtins.block_dim;
  const bool flat = dim.y == 1 && dim.z == 1;
  // Rounds alternate the order in which threads run (forwards, then backwards), so a kernel whose
  // result depends on the order of threads between two barriers (a race on a GPU) shows it.
  for (unsigned live = threads, round = 0; live > 0; ++round) {
    live = 0;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = round % 2 == 0 ? i : threads - 1 - i;
      if (blk.done[t]) continue;
      blk.current = t;
      builtins.thread_idx = flat ? uint3{t, 0, 0} : uint3{t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y)};
      switch_context(blk.scheduler, blk.fibers[t]);
      if (!blk.done[t]) ++live;  // waiting at __syncthreads()
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
  blk.done.resize(threads);
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
#undef __shared__
#define __shared__ static
#define __syncthreads() ::scorefast_emulation::syncthreads()
#define cudaGetLastError() ::scorefast_emulation::take_last_error()
#define SF_LAUNCH(kernel, grid, block, stream, ...) \
  ::scorefast_emulation::launch(kernel, grid, block, stream, __VA_ARGS__)
