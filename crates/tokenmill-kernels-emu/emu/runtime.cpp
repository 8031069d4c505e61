// The emulator's scheduler: runs a launch's blocks one after another, each
// block's threads as fibers on the calling OS thread.
#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace tm_emu {

thread_local const Thread* current = nullptr;
thread_local dim3 block_index, block_dim, grid_dim;
thread_local unsigned char* dynamic_shared_base = nullptr;

namespace {

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// Kernels keep a few registers' worth of locals; 64 KiB is ample and keeps
// a block of 1024 threads at 64 MiB.
constexpr std::size_t kStackBytes = 64 * 1024;
// Bytes past the dynamic shared memory that must survive the block.
constexpr std::size_t kSharedGuard = 256;
constexpr unsigned char kPoison = 0xff;  // NaN in every float width

// ------------------------------------------------------------- contexts
//
// A fiber switch saves what the C ABI says a call preserves and loads
// another fiber's. On x86-64 that is six registers, the stack pointer and
// the float control words, which a few instructions do; glibc's
// swapcontext would also save and restore the signal mask, a system call
// each way, which made it most of the emulator's time. Elsewhere,
// swapcontext it is.

#if defined(__x86_64__)

// tm_emu_switch(save, load): pushes the callee-saved registers and the
// MXCSR / x87 control words, stores the stack pointer in *save, loads
// `load` and pops the other fiber's. A fresh fiber's stack is laid out so
// that the pops and `ret` land in its entry function (start_context).
asm(R"(
  .text
  .p2align 4
  .globl tm_emu_switch
  .hidden tm_emu_switch
  .type tm_emu_switch, @function
tm_emu_switch:
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
  .size tm_emu_switch, .-tm_emu_switch
)");

extern "C" void tm_emu_switch(void** save, void* load);

struct Context {
  void* sp = nullptr;
};

// Prepares `context` to start `entry` (which must never return) on `stack`.
void start_context(Context& context, char* stack, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* words = reinterpret_cast<uint64_t*>(top);
  words[-1] = 0;                                     // entry's return address: none
  words[-2] = reinterpret_cast<uint64_t>(entry);     // where tm_emu_switch returns
  for (int r = 3; r <= 8; ++r) words[-r] = 0;        // rbp rbx r12 r13 r14 r15
  words[-9] = 0x1f80ull | (0x037full << 32);         // MXCSR and x87 control defaults
  context.sp = &words[-9];
  // After the pops and `ret`, rsp = top - 8: as just after a call, the
  // alignment the ABI gives a function's entry.
}

void switch_context(Context& from, Context& to) { tm_emu_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t context{};
};

void start_context(Context& context, char* stack, std::size_t size, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = size;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

#endif

struct Fiber {
  Thread thread{};
  Context context;
  std::unique_ptr<char[]> stack;
  State state = State::Done;
  unsigned exchanges = 0;  // warp exchanges so far (picks the slot bank)
};

struct Run {
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> warp_slots;
  void (*trampoline)(void**) = nullptr;
  void** args = nullptr;
  Fiber* running = nullptr;
  bool failed = false;
  std::string error;
};

thread_local Run* active = nullptr;

void yield(State state) {
  Fiber* fiber = active->running;
  fiber->state = state;
  switch_context(fiber->context, active->scheduler);
}

[[noreturn]] void fiber_main() {
  active->trampoline(active->args);
  yield(State::Done);
  __builtin_unreachable();  // the scheduler never resumes a finished fiber
}

// A small deterministic generator for the order threads run in.
struct Order {
  uint64_t state;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  void shuffle(std::vector<unsigned>& items) {
    for (std::size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[next() % i]);
  }
};

// Runs one block to completion; false (with run.error set) on a misuse.
bool run_block(Run& run, Order& order, unsigned threads) {
  const unsigned warps = (threads + 31) / 32;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = run.fibers[t];
    fiber.thread.index = dim3{t, 0, 0};
    fiber.thread.lane = t % 32;
    fiber.thread.warp = t / 32;
    fiber.state = State::Runnable;
    fiber.exchanges = 0;
    start_context(fiber.context, fiber.stack.get(), kStackBytes, fiber_main);
  }
  std::vector<unsigned> sequence(threads);
  for (unsigned t = 0; t < threads; ++t) sequence[t] = t;
  for (;;) {
    order.shuffle(sequence);
    for (unsigned t : sequence) {
      Fiber& fiber = run.fibers[t];
      if (fiber.state != State::Runnable) continue;
      run.running = &fiber;
      current = &fiber.thread;
      switch_context(run.scheduler, fiber.context);
      if (run.failed) return false;
    }
    // Every thread now waits at a barrier or is done.
    bool any_live = false, released = false;
    for (unsigned w = 0; w < warps; ++w) {
      unsigned live = 0, at_warp = 0;
      for (unsigned t = w * 32; t < std::min(threads, w * 32 + 32); ++t) {
        const State s = run.fibers[t].state;
        live += s != State::Done;
        at_warp += s == State::AtWarpBarrier;
      }
      any_live |= live > 0;
      if (live == 0 || at_warp != live) continue;
      if (live != 32) {
        run.error = "a warp exchange with " + std::to_string(live) +
                    " of 32 lanes (the others exited or the block is not whole warps)";
        return false;
      }
      for (unsigned t = w * 32; t < w * 32 + 32; ++t) run.fibers[t].state = State::Runnable;
      released = true;
    }
    if (!any_live) return true;
    if (released) continue;
    bool all_at_block = true;
    for (unsigned t = 0; t < threads; ++t) {
      const State s = run.fibers[t].state;
      all_at_block &= s == State::Done || s == State::AtBlockBarrier;
    }
    if (!all_at_block) {
      run.error = "threads wait at different barriers (a __syncthreads or a shuffle in divergent code)";
      return false;
    }
    for (unsigned t = 0; t < threads; ++t)
      if (run.fibers[t].state == State::AtBlockBarrier) run.fibers[t].state = State::Runnable;
  }
}

}  // namespace

void sync_block() { yield(State::AtBlockBarrier); }

void sync_warp() { yield(State::AtWarpBarrier); }

uint64_t* next_warp_slots() {
  Fiber* fiber = active->running;
  const std::size_t bank = fiber->exchanges++ & 1u;
  return &active->warp_slots[(std::size_t(fiber->thread.warp) * 2 + bank) * 32];
}

void fail(const char* what) {
  active->failed = true;
  active->error = what;
  yield(State::Done);
  __builtin_unreachable();  // the scheduler never resumes a failed fiber
}

}  // namespace tm_emu

extern "C" int tm_emu_launch(const tm_emu_kernel* kernel, void** args, unsigned grid_x,
                             unsigned grid_y, unsigned grid_z, unsigned threads,
                             unsigned shared_bytes, unsigned long long seed, char* error,
                             std::size_t error_len) {
  using namespace tm_emu;
  auto report = [&](const std::string& what) {
    std::snprintf(error, error_len, "%s: %s", kernel->name, what.c_str());
    return 1;
  };
  if (threads == 0 || threads > 1024) return report("a block of " + std::to_string(threads) + " threads");
  if (grid_x == 0 || grid_y == 0 || grid_z == 0) return report("an empty grid");
  Run run;
  run.trampoline = kernel->trampoline;
  run.args = args;
  run.fibers.resize(threads);
  for (Fiber& fiber : run.fibers) fiber.stack = std::make_unique<char[]>(kStackBytes);
  run.warp_slots.assign(std::size_t((threads + 31) / 32) * 2 * 32, 0);
  std::vector<uint64_t> shared((shared_bytes + kSharedGuard + 7) / 8);
  unsigned char* shared_bytes_ptr = reinterpret_cast<unsigned char*>(shared.data());
  Order order{seed | 1};

  Run* outer = active;
  active = &run;
  dynamic_shared_base = shared_bytes_ptr;
  block_dim = dim3{threads, 1, 1};
  grid_dim = dim3{grid_x, grid_y, grid_z};
  int status = 0;
  for (unsigned z = 0; z < grid_z && status == 0; ++z)
    for (unsigned y = 0; y < grid_y && status == 0; ++y)
      for (unsigned x = 0; x < grid_x && status == 0; ++x) {
        block_index = dim3{x, y, z};
        std::memset(shared_bytes_ptr, kPoison, shared_bytes + kSharedGuard);
        if (!run_block(run, order, threads)) {
          status = report(run.error + " in block (" + std::to_string(x) + ", " +
                          std::to_string(y) + ", " + std::to_string(z) + ")");
        } else if (std::any_of(shared_bytes_ptr + shared_bytes,
                               shared_bytes_ptr + shared_bytes + kSharedGuard,
                               [](unsigned char b) { return b != kPoison; })) {
          status = report("a write past the " + std::to_string(shared_bytes) +
                          " bytes of dynamic shared memory");
        }
      }
  active = outer;
  current = nullptr;
  return status;
}
