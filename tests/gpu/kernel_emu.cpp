// tests/gpu/kernel_emu.cpp: kernels.cu.in run on the CPU, for tests on machines without a GPU.
// Built as a shared library by tests/test_cuda_emu.c (c++ -std=c++17 -shared, with one row of the
// specialization table as -D options, and -DMB_KERNEL_EMULATION); mb_emu_launch(name, grid,
// block, shared bytes, args) runs a kernel as cuLaunchKernel would.
//
// How: the blocks of a launch run one after another; the threads of a block are coroutines
// (ucontext) on one OS thread, each running until it reaches a barrier (__syncthreads, or a warp
// shuffle / __syncwarp for its warp) or ends. Between two barriers the threads run in index
// order, then in reverse order in the next phase, so a barrier the code is missing shows up as a
// read of a value another thread has not written yet (or already overwritten) in one of the two
// orders. Dynamic shared memory starts as NaN bytes, so a read of a value nobody wrote shows.
// What this cannot show: races of real concurrent execution, memory-model effects, bank
// conflicts, register or launch limits, speed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <ucontext.h>
#include <utility>
#include <vector>

struct EmuDim {
    unsigned x, y, z;
};
static EmuDim emu_threadIdx, emu_blockIdx, emu_gridDim, emu_blockDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define gridDim emu_gridDim
#define blockDim emu_blockDim
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __shared__ static
static unsigned char *emu_smem;
#define DYNAMIC_SMEM(T, name) T *name = reinterpret_cast<T *>(emu_smem)

static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
static inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
static inline float atomicAdd(float *p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}

// round to nearest even f32 -> f16 -> f32 (medbot.c's f32_to_f16 and f16_to_f32)
static float emu_f16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, au = u & 0x7FFFFFFFu;
    uint16_t h;
    if (au > 0x7F800000u) h = (uint16_t)(sign | 0x7E00);
    else if (au >= 0x477FF000u) h = (uint16_t)(sign | 0x7C00);
    else if (au < 0x38800000u) {
        float a;
        memcpy(&a, &au, 4);
        float scaled = a * 16777216.0f;
        uint32_t m = (uint32_t)scaled;
        float frac = scaled - (float)m;
        if (frac > 0.5f || (frac == 0.5f && (m & 1))) m++;
        h = (uint16_t)(sign | m);
    } else {
        uint32_t r = au + 0xFFFu + ((au >> 13) & 1u);
        h = (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    uint32_t s2 = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, man = h & 0x3FF, o;
    if (e == 0) {
        if (man == 0) o = s2;
        else {
            int k = -1;
            do man <<= 1, k++;
            while (!(man & 0x400));
            o = s2 | ((uint32_t)(127 - 15 - k) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (e == 31) o = s2 | 0x7F800000u | (man << 13);
    else o = s2 | ((e + 127 - 15) << 23) | (man << 13);
    float r;
    memcpy(&r, &o, 4);
    return r;
}

// ---- the coroutines of one block ----

enum { CO_RUN, CO_WAIT_BLOCK, CO_WAIT_WARP, CO_DONE };
struct Co {
    ucontext_t ctx;
    int state;
    unsigned gen;
};
static const int MAX_THREADS = 1024;
static Co cos_[MAX_THREADS];
static std::vector<char> stacks;
static const size_t STACK = 256 << 10;
static ucontext_t sched;
static int cur, nthreads, done_threads, warp_done[MAX_THREADS / 32];
static unsigned block_gen, block_arrived, warp_gen[MAX_THREADS / 32], warp_arrived[MAX_THREADS / 32];
static double warp_slot[MAX_THREADS / 32][32];
static std::function<void()> body;
static const char *failure;

static void co_yield_() { swapcontext(&cos_[cur].ctx, &sched); }

static void release_if_complete(int w) {
    if (block_arrived && block_arrived + done_threads == (unsigned)nthreads) block_arrived = 0, block_gen++;
    int lanes = nthreads - w * 32 < 32 ? nthreads - w * 32 : 32;
    if (warp_arrived[w] && warp_arrived[w] + warp_done[w] == (unsigned)lanes) warp_arrived[w] = 0, warp_gen[w]++;
}

static void __syncthreads() {
    Co &c = cos_[cur];
    c.gen = block_gen, c.state = CO_WAIT_BLOCK;
    block_arrived++;
    release_if_complete(cur >> 5);
    co_yield_();
}

static void emu_warp_sync() {
    int w = cur >> 5;
    Co &c = cos_[cur];
    c.gen = warp_gen[w], c.state = CO_WAIT_WARP;
    warp_arrived[w]++;
    release_if_complete(w);
    co_yield_();
}
static void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
    (void)mask;
    emu_warp_sync();
}

template <class T> static T __shfl_xor_sync(unsigned mask, T v, int o) {
    (void)mask;
    static_assert(sizeof(T) <= sizeof(double), "shuffle of a wide type");
    int w = cur >> 5, lane = cur & 31;
    memcpy(&warp_slot[w][lane], &v, sizeof v);
    emu_warp_sync();
    T r;
    memcpy(&r, &warp_slot[w][lane ^ o], sizeof r);
    emu_warp_sync();
    return r;
}

static void co_main() {
    body();
    int w = cur >> 5;
    cos_[cur].state = CO_DONE;
    done_threads++, warp_done[w]++;
    release_if_complete(w);
}

// runs one block of n threads; returns 0, or 1 on a deadlock (threads waiting at different barriers)
static int run_block(int n) {
    nthreads = n, done_threads = 0, block_arrived = 0;
    for (int w = 0; w < (n + 31) / 32; w++) warp_done[w] = 0, warp_arrived[w] = 0;
    if (stacks.size() < (size_t)n * STACK) stacks.resize((size_t)n * STACK);
    for (int i = 0; i < n; i++) {
        getcontext(&cos_[i].ctx);
        cos_[i].ctx.uc_stack.ss_sp = &stacks[(size_t)i * STACK];
        cos_[i].ctx.uc_stack.ss_size = STACK;
        cos_[i].ctx.uc_link = &sched;
        makecontext(&cos_[i].ctx, co_main, 0);
        cos_[i].state = CO_RUN;
    }
    for (int reverse = 0;; reverse ^= 1) {
        int alive = 0, ran = 0;
        for (int k = 0; k < n; k++) {
            int i = reverse ? n - 1 - k : k;
            Co &c = cos_[i];
            if (c.state == CO_DONE) continue;
            alive++;
            if (c.state == CO_WAIT_BLOCK && c.gen == block_gen) continue;
            if (c.state == CO_WAIT_WARP && c.gen == warp_gen[i >> 5]) continue;
            c.state = CO_RUN;
            cur = i;
            emu_threadIdx = EmuDim{(unsigned)i, 0, 0};
            swapcontext(&sched, &c.ctx);
            ran++;
        }
        if (!alive) return 0;
        if (!ran) {
            failure = "deadlock: threads wait at barriers that never complete";
            return 1;
        }
    }
}

#define MB_KERNEL_EMULATION
#include "../../kernels.cu.in"

// ---- launching ----

template <class... A, size_t... I> static void call_with(void (*k)(A...), void **args, std::index_sequence<I...>) {
    k(*reinterpret_cast<typename std::remove_reference<A>::type *>(args[I])...);
}
struct Kernel {
    const char *name;
    std::function<void(void **)> run;
};
template <class... A> static Kernel kernel(const char *name, void (*k)(A...)) {
    return Kernel{name, [k](void **args) { call_with(k, args, std::index_sequence_for<A...>{}); }};
}
#define K(name) kernel(#name, name)
static const std::vector<Kernel> kernels = {
    K(embedding_forward), K(rmsnorm_forward), K(rmsnorm_backward), K(rope_forward), K(kv_store), K(swiglu_forward),
    K(swiglu_backward), K(add_forward), K(gather_rows), K(scatter_rows), K(dropout_forward), K(random_bytes),
    K(random_normal_bf16), K(f32_to_bf16_vec), K(bf16_to_f32_vec), K(scale_f32), K(fill_f32), K(accumulate_f64),
    K(from_f64), K(sumsq_partial), K(adamw), K(nf4_dequant), K(nf4_gemv), K(logprob_chunk), K(logprob_finish),
    K(logprob_grad_chunk), K(attention_forward), K(attention_delta), K(attention_backward)};

extern "C" int mb_emu_launch(const char *name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem,
                             void **args, char *err, size_t errn) {
    const Kernel *k = nullptr;
    for (const Kernel &c : kernels)
        if (!strcmp(c.name, name)) k = &c;
    if (!k) return snprintf(err, errn, "kernel %s is not in the emulator", name), 1;
    if (bx > (unsigned)MAX_THREADS) return snprintf(err, errn, "%s: %u threads per block", name, bx), 1;
    std::vector<unsigned char> dyn(smem + 16, 0xFF); // NaN bytes: a read of what nobody wrote shows
    emu_smem = dyn.data();
    emu_gridDim = EmuDim{gx, gy, gz}, emu_blockDim = EmuDim{bx, 1, 1};
    failure = nullptr;
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                emu_blockIdx = EmuDim{x, y, z};
                body = [k, args] { k->run(args); };
                if (run_block((int)bx)) return snprintf(err, errn, "%s block (%u, %u, %u): %s", name, x, y, z, failure), 1;
            }
    return 0;
}

extern "C" const int *mb_emu_params(void) { return mb_kernel_params; }
