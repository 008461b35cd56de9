
#include <pthread.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

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
