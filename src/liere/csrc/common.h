
#include <pthread.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* The vector unit the compiler targets (-march=native where it builds): bytes per register
   and how many registers. Every kernel sizes its vectors and register tiles from these, so
   that accumulators stay in registers: 64-byte vectors on a 16-register AVX2 machine are
   two registers each, and the 64x64 product's 16 accumulators then spilled to the stack
   (dense LieRE 5x slower than PyTorch's own path on an AMD EPYC with AVX2). */
#if defined(__AVX512F__)
#define LIERE_VBYTES 64
#define LIERE_VREGS 32
#elif defined(__AVX__)
#define LIERE_VBYTES 32
#define LIERE_VREGS 16
#elif defined(__aarch64__)
#define LIERE_VBYTES 16
#define LIERE_VREGS 32
#else
#define LIERE_VBYTES 16
#define LIERE_VREGS 16
#endif
/* what this build targets, for kernels.status() */
int liere_vector_bytes(void) { return LIERE_VBYTES; }
int liere_vector_registers(void) { return LIERE_VREGS; }

/* matrices per vector batch in the squarings of small blocks: one float per lane */
#define LW (LIERE_VBYTES / 4)
/* rows per register tile for a row of nc vectors: half the registers hold accumulators */
#define LIERE_RB(nc) \
    ((LIERE_VREGS / 2) / (nc) < 1 ? 1 : (LIERE_VREGS / 2) / (nc) > 4 ? 4 : (LIERE_VREGS / 2) / (nc))

/* Two-source lane shuffles for transposing a W x W tile held in W vectors of W lanes
   (gemm.c.in's transpose): round d swaps bit d of the row index with bit d of the lane
   index, so rows i and i + d (bit d of i clear) become LO and HI picks of lanes 0..W-1 of
   row i and W..2W-1 of row i + d. After every round, element (i, l) sits at (l, i). Used
   where the compiler has __builtin_shufflevector (clang; GCC 12 and later). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define LIERE_SHUFFLES 1
#define LIERE_LO_4_2 0, 1, 4, 5
#define LIERE_HI_4_2 2, 3, 6, 7
#define LIERE_LO_4_1 0, 4, 2, 6
#define LIERE_HI_4_1 1, 5, 3, 7
#define LIERE_LO_8_4 0, 1, 2, 3, 8, 9, 10, 11
#define LIERE_HI_8_4 4, 5, 6, 7, 12, 13, 14, 15
#define LIERE_LO_8_2 0, 1, 8, 9, 4, 5, 12, 13
#define LIERE_HI_8_2 2, 3, 10, 11, 6, 7, 14, 15
#define LIERE_LO_8_1 0, 8, 2, 10, 4, 12, 6, 14
#define LIERE_HI_8_1 1, 9, 3, 11, 5, 13, 7, 15
#define LIERE_LO_16_8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define LIERE_HI_16_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LIERE_LO_16_4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define LIERE_HI_16_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LIERE_LO_16_2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define LIERE_HI_16_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LIERE_LO_16_1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define LIERE_HI_16_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
/* one round d on the W rows r[0..W-1] */
#define LIERE_ROUND(r, W, d)                                                             \
    for (int i_ = 0; i_ < W; i_++)                                                       \
        if (!(i_ & d)) {                                                                 \
            const __typeof__(r[0]) a_ = r[i_], b_ = r[i_ + d];                           \
            r[i_] = __builtin_shufflevector(a_, b_, LIERE_LO_##W##_##d);                 \
            r[i_ + d] = __builtin_shufflevector(a_, b_, LIERE_HI_##W##_##d);             \
        }
#endif

typedef void (*range_fn)(const void *ctx, int64_t lo, int64_t hi);

/* buffer aligned for the widest vector type used (16 doubles); C11 aligned_alloc wants a
   size that is a multiple of the alignment */
static void *alloc_vectors(size_t size) {
    return aligned_alloc(128, (size + 127) / 128 * 128);
}
#ifndef _OPENMP
typedef struct { range_fn fn; const void *ctx; int64_t lo, hi; } job_t;

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    if (j->lo < j->hi) j->fn(j->ctx, j->lo, j->hi);
    return NULL;
}
#endif

/* how many parts a kernel cuts its work into for `threads` threads: one per thread, as
   many as parallel_for runs */
static inline int64_t thread_parts(int threads) {
    return threads < 1 ? 1 : threads > 64 ? 64 : threads;
}

/* [*lo, *hi): part p of [0, n) cut into `parts` near-equal contiguous pieces */
static inline void share_of(int64_t n, int64_t p, int64_t parts, int64_t *lo, int64_t *hi) {
    *lo = n * p / parts;
    *hi = n * (p + 1) / parts;
}

/* fn over [0, n) split in `threads` contiguous ranges. With OpenMP (the build links the
   libgomp torch has loaded, same soname) the ranges run on torch's own worker threads, which
   are awake right after torch's parallel ops; otherwise on fresh pthreads. */
static void parallel_for(range_fn fn, const void *ctx, int64_t n, int threads) {
    if (n <= 0) return;
    if (threads > 64) threads = 64;
    if (threads > n) threads = (int)n;
    if (threads <= 1) { fn(ctx, 0, n); return; }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int64_t count = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t chunk = (n + count - 1) / count;
        const int64_t lo = t * chunk < n ? t * chunk : n, hi = lo + chunk < n ? lo + chunk : n;
        if (lo < hi) fn(ctx, lo, hi);
    }
#else
    pthread_t tid[64];
    job_t jobs[64];
    int started[64];
    int64_t chunk = (n + threads - 1) / threads;
    int t;
    for (t = 0; t < threads; t++) {
        int64_t lo = (int64_t)t * chunk, hi = lo + chunk;
        jobs[t].fn = fn; jobs[t].ctx = ctx;
        jobs[t].lo = lo < n ? lo : n; jobs[t].hi = hi < n ? hi : n;
    }
    for (t = 1; t < threads; t++)
        started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_job(&jobs[t]);
    }
#endif
}
