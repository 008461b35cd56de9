
#include <pthread.h>
#include <stdatomic.h>
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

/* the products' register tile (gemm.c.in): GQ vectors of a row (at most 2) by GR rows, as
   many as fit in the registers beside GQ vectors of b and one broadcast */
#define LIERE_GQ(nc) ((nc) < 2 ? (nc) : 2)
#define LIERE_GR(s, nc) \
    ((LIERE_VREGS - LIERE_GQ(nc) - 1) / LIERE_GQ(nc) < (s) ? (LIERE_VREGS - LIERE_GQ(nc) - 1) / LIERE_GQ(nc) : (s))

/* lanes of one vector register per real type (the RoPE kernel's channel-pair swap) */
#if LIERE_VBYTES == 64
#define LIERE_LANES_float 16
#define LIERE_LANES_double 8
#elif LIERE_VBYTES == 32
#define LIERE_LANES_float 8
#define LIERE_LANES_double 4
#else
#define LIERE_LANES_float 4
#define LIERE_LANES_double 2
#endif

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
/* lane i <- lane i ^ 1 for W lanes: the two channels of every pair swapped */
#define LIERE_PAIRSWAP_2 1, 0
#define LIERE_PAIRSWAP_4 1, 0, 3, 2
#define LIERE_PAIRSWAP_8 1, 0, 3, 2, 5, 4, 7, 6
#define LIERE_PAIRSWAP_16 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define LIERE_PAIRSWAP_(W) LIERE_PAIRSWAP_##W
#define LIERE_PAIRSWAP(W) LIERE_PAIRSWAP_(W)
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

/* Note [kernel threads]
   ~~~~~~~~~~~~~~~~~~~~~
   parallel_for(fn, ctx, n, threads) cuts [0, n) into `threads` contiguous pieces, the same
   pieces whoever runs them, so the bits never depend on scheduling. Thread t first claims
   piece t (the rows torch's own ops just gave thread t, still in its core's cache), then
   any piece left unclaimed. Two ways to run them:

   * OpenMP, where the build has it: one region on torch's worker threads. On a quiet
     machine this is the fastest way; torch's workers spin for a while after each of torch's
     ops, so they start at once, and a thread of our own would share a core with that
     spinning worker (the pool alone ran dense LieRE's layer 5-10% slower).
   * The pool: helpers started on first use (up to `threads` - 1, at most 63) that sleep on
     a condition variable between calls. The caller publishes the job, wakes them, and
     claims pieces itself; when none is left it waits for the pieces helpers are running,
     never for a helper that has not woken.

   An OpenMP region ends at a barrier that waits for every thread of its team. On a machine
   with a competing load a descheduled worker holds that barrier for a time slice, at every
   one of the kernels' calls (LieRE's layer makes three each way). So when a worker arrives
   to find its own piece taken (it was late by a whole piece), the next LIERE_POOL_CALLS
   calls run on the pool, and then OpenMP is tried again. On a quiet machine it happens
   by chance now and then (0-1 times in 36 training steps); under a load about once in 64
   calls. liere.kernels.pool_switches() counts it; docs/performance.md has the measurements.

   A second caller that finds the pool busy (another Python thread) runs its pieces itself,
   in order. After fork() the child starts with an empty pool, since the helpers did not
   survive the fork. If a helper cannot be started the caller runs the pieces. */
#define LIERE_MAX_HELPERS 63
#define LIERE_POOL_CALLS 64

typedef _Atomic unsigned char claim_t;

static void run_piece(range_fn fn, const void *ctx, int64_t n, int64_t pieces, int64_t p) {
    int64_t lo, hi;
    share_of(n, p, pieces, &lo, &hi);
    if (lo < hi) fn(ctx, lo, hi);
}

/* runs every unclaimed piece, piece `first` first; returns whether `first` was still free */
static int claim_pieces(range_fn fn, const void *ctx, int64_t n, int64_t pieces,
                        claim_t *claimed, int64_t first) {
    int own = 0;
    for (int64_t k = 0; k < pieces; k++) {
        const int64_t p = (first + k) % pieces;
        if (!atomic_exchange(&claimed[p], 1)) {
            run_piece(fn, ctx, n, pieces, p);
            if (k == 0) own = 1;
        }
    }
    return own;
}

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, idle;
    int helpers;          /* started */
    unsigned long job;    /* number of the latest job; helpers sleep until it changes */
    int open;             /* the latest job still takes helpers */
    int active;           /* helpers inside the latest job */
    int want;             /* helpers the latest job takes (indices below it) */
    range_fn fn;
    const void *ctx;
    int64_t n, pieces;
    claim_t claimed[LIERE_MAX_HELPERS + 1];
    _Atomic int busy;     /* a caller owns the pool */
    unsigned long born[LIERE_MAX_HELPERS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *helper_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    unsigned long seen = pool.born[index];
    for (;;) {
        while (pool.job == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.job;
        if (!pool.open || index >= pool.want) continue;
        pool.active++;
        const range_fn fn = pool.fn;
        const void *ctx = pool.ctx;
        const int64_t n = pool.n, pieces = pool.pieces;
        pthread_mutex_unlock(&pool.mu);
        claim_pieces(fn, ctx, n, pieces, pool.claimed, index + 1);
        pthread_mutex_lock(&pool.mu);
        if (--pool.active == 0) pthread_cond_signal(&pool.idle);
    }
    return NULL;
}

static void pool_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.helpers = pool.open = pool.active = pool.want = 0;
    atomic_store(&pool.busy, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void pool_for(range_fn fn, const void *ctx, int64_t n, int64_t pieces) {
    if (atomic_exchange(&pool.busy, 1)) {
        for (int64_t p = 0; p < pieces; p++) run_piece(fn, ctx, n, pieces, p);
        return;
    }
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.mu);
    while (pool.helpers < pieces - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool.born[pool.helpers] = pool.job;
        const int failed = pthread_create(&tid, &attr, helper_main, (void *)(intptr_t)pool.helpers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.helpers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.pieces = pieces;
    for (int64_t p = 0; p < pieces; p++) atomic_store(&pool.claimed[p], 0);
    pool.want = (int)pieces - 1;
    pool.open = 1;
    pool.job++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    claim_pieces(fn, ctx, n, pieces, pool.claimed, 0);
    pthread_mutex_lock(&pool.mu);
    pool.open = 0;
    while (pool.active > 0) pthread_cond_wait(&pool.idle, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    atomic_store(&pool.busy, 0);
}

static _Atomic int pool_calls_left; /* calls the pool runs after an OpenMP worker came late */
static _Atomic long pool_switches;  /* how often a worker came late */
long liere_pool_switches(void) { return atomic_load(&pool_switches); }

static void parallel_for(range_fn fn, const void *ctx, int64_t n, int threads) {
    if (n <= 0) return;
    if (threads > LIERE_MAX_HELPERS + 1) threads = LIERE_MAX_HELPERS + 1;
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    const int64_t pieces = threads;
#ifdef _OPENMP
    if (atomic_load(&pool_calls_left) <= 0) {
        claim_t claimed[LIERE_MAX_HELPERS + 1] = {0};
        _Atomic int late = 0;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num();
            if (!claim_pieces(fn, ctx, n, pieces, claimed, t % pieces) && t > 0)
                atomic_store(&late, 1);
        }
        if (atomic_load(&late)) {
            atomic_store(&pool_calls_left, LIERE_POOL_CALLS);
            atomic_fetch_add(&pool_switches, 1);
        }
        return;
    }
    atomic_fetch_sub(&pool_calls_left, 1);
#endif
    pool_for(fn, ctx, n, pieces);
}
