"""Optional compiled CPU kernels for the two hot loops of LieRE: the squarings and the
blockwise application of the rotations to q and k.

Note [compiled kernels]
~~~~~~~~~~~~~~~~~~~~~~~
After the series GEMM the work left per token is small (an 8x8 product is 512 multiply-adds)
but there are many tokens: torch.bmm of 9,408 8x8 matrices spends most of its time on
per-matrix overhead, the eager entry-major products of ``functional`` make one pass over
the whole batch per multiply-add row, and rotating q and k through bmm needs a gather and a
scatter of both. Plain C loops keep each matrix in registers or L1 instead:

* ``squarings``: ``R = T^(2^j_n)`` per matrix, each token with its own ``j_n`` (Note
  [per-token squarings] in ``functional``), written straight into the ``(h, n, m, s, s)``
  layout the application reads (into given rows of a larger tensor when some tokens come
  from products along rays). Blocks up to 16 are squared 16 at a time, one matrix per
  vector lane; blocks of 32 and 64 one at a time with a register-tiled product. The backward
  recomputes the squares from ``T`` (nothing but ``T`` is saved) and runs
  ``G <- G S^T + S^T G`` per matrix. Keeping the squares instead was measured slower here
  (57 MB more written and read per dense ViT-S layer at batch 8 cost more than the third of
  the backward's products it saves), with or without huge pages.
* ``rays``: ``R[dst] = R[left] @ R[right]`` for the tokens split along rays (Note [products
  along rays] in ``functional``), one task per (head, block), operands copied into L1-sized
  buffers first (a product read straight from a tensor of tens of MB stalled on every first
  touch, 4x slower); the backward accumulates in a per-task scratch and writes out the
  gradient of the directly computed tokens only.
* ``apply``: ``q' = R q`` and ``k' = R k`` block by block for blocks up to 64, read in place
  from any strides (q and k are usually views of one qkv tensor) and written to fresh
  contiguous tensors, prefix tokens copied; one token per task, batch rows in tiles that
  share each load of ``R``. The backward gives ``R^T dq'`` and ``dR = sum_batch dq' q^T``.

All split their work over torch's OpenMP threads: built with ``-fopenmp``, the library
links ``libgomp.so.1``, which resolves to the copy torch has loaded, so the kernels run on
torch's worker threads (awake right after torch's own parallel ops) instead of competing
with them. Without OpenMP they start pthreads. Their outputs come from torch's allocator.

The source is C11 with GCC/Clang vector extensions and pthreads (no Python or torch
headers), compiled on first use with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) in a few seconds and cached under ``$LIERE_CACHE_DIR``
(default ``~/.cache/liere``), keyed by the source, the compiler and the CPU. Without a
compiler, on other devices, or with ``LIERE_KERNELS=0``, everything runs on the PyTorch
path, which is also the reference the tests compare with.

Environment: ``LIERE_KERNELS=0`` (off), ``LIERE_CACHE_DIR`` (where the library is cached),
``CC`` (the compiler), ``LIERE_KERNELS_OPENMP=0`` (build with pthreads instead of OpenMP),
``LIERE_KERNEL_THREADS`` (threads per call; default ``torch.get_num_threads()``).

The first build is announced on the ``liere.kernels`` logger (a warning, so it shows by
default) and can be done ahead of time: ``python -m liere.kernels``. The cache directory
must belong to the current user and be writable by nobody else; otherwise the kernels stay
off (with the reason in ``unavailable_reason()``) rather than load a library another user
could have planted. There is no fallback to a shared temporary directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "available",
    "unavailable_reason",
    "usable",
    "status",
    "SIZES",
    "APPLY_SIZES",
    "MAX_SQUARINGS",
    "RAY_SIZES",
    "ray_products_forward",
    "ray_products_backward",
]

_LOG = logging.getLogger(__name__)

# block sizes compiled; other sizes use the PyTorch path
SIZES = (4, 8, 16, 32, 64)
# block sizes of the compiled application (dense heads too: one pass over q and k instead of
# gathers, scatters and a batched GEMM)
APPLY_SIZES = (4, 8, 16, 32, 64)
# squarings per matrix the kernels accept (stack buffers); more falls back to PyTorch
MAX_SQUARINGS = 24
# block sizes of the compiled products along rays
RAY_SIZES = (4, 8, 16, 32, 64)
# matrices per vector batch in the squarings (16 floats fill an AVX-512 register)
_LANES = 16

_COMMON = r"""
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
"""

# Pieces shared by both squaring templates: the context (where the series, the squaring counts,
# the upstream gradient and the output are) and the exported entry point, whose work items are
# lane groups (small blocks) or single matrices (large blocks).
_SQ_CONTEXT = """typedef struct {
    const REAL *t;          /* series: entry e = i*S+j of block (h, m) of token n at   */
    int64_t se, sh, sm, sn; /*   t[e*se + h*sh + m*sm + n*sn]                           */
    const int32_t *sq;      /* squarings per token (n)                                  */
    const REAL *grad;       /* backward: dL/dR, (H, NO, M, S, S) contiguous             */
    REAL *out;              /* forward: R (H, NO, M, S, S); backward: dL/dT, strides of t */
    const int64_t *rows;    /* row of R (and dL/dR) for token n: rows[n], or n if NULL  */
    int64_t H, M, N, NO;
} sq_ctx_SFX;

static inline int64_t row_SFX(const sq_ctx_SFX *c, int64_t n) { return c->rows ? c->rows[n] : n; }
"""

_SQ_ENTRY = """void liere_squarings_SFX(const REAL *t, const int64_t *strides, const int32_t *sq,
                         const REAL *grad, REAL *out, const int64_t *rows, int64_t H,
                         int64_t M, int64_t N, int64_t NO, int backward, int threads) {
    sq_ctx_SFX c;
    c.t = t; c.se = strides[0]; c.sh = strides[1]; c.sm = strides[2]; c.sn = strides[3];
    c.sq = sq; c.grad = grad; c.out = out; c.rows = rows; c.H = H; c.M = M; c.N = N; c.NO = NO;
    parallel_for(backward ? sq_bwd_range_SFX : sq_fwd_range_SFX, &c, ITEMS, threads);
}
"""


def _with_shared_pieces(template: str) -> str:
    """Expand ``SQ_CONTEXT`` and ``SQ_ENTRY(items)`` in a squaring template."""
    template = template.replace("SQ_CONTEXT\n", _SQ_CONTEXT)
    return re.sub(r"SQ_ENTRY\((.*)\)\n", lambda m: _SQ_ENTRY.replace("ITEMS", m.group(1)), template)


# Dense S x S products and transposes, one instance per (real type, block size S), used by the
# large-block squarings, the products along rays and the application.
_GEMM = r"""
/* ---------------- SFX: REAL, S x S products ---------------- */

typedef REAL mchunk_SFX __attribute__((vector_size(sizeof(REAL) * CW)));

/* c = a @ b, or c += a @ b when acc, for row-major S x S matrices; always inlined, so that
   each call site gets its own copy with acc known (as an out-of-line function called from
   several places it ran 2.5x slower) */
static ALWAYS_INLINE void gemm_SFX(const REAL *restrict a, const REAL *restrict b,
                                   REAL *restrict c, int acc) {
    for (int i0 = 0; i0 < S; i0 += RB) {
        mchunk_SFX sum[RB][NC];
        for (int r = 0; r < RB; r++)
            for (int q = 0; q < NC; q++) {
                if (acc) memcpy(&sum[r][q], c + (i0 + r) * S + q * CW, sizeof(mchunk_SFX));
                else sum[r][q] = (mchunk_SFX){0};
            }
        for (int k = 0; k < S; k++) {
            mchunk_SFX bk[NC];
            memcpy(bk, b + k * S, sizeof(bk));
            for (int r = 0; r < RB; r++) {
                const REAL aik = a[(i0 + r) * S + k];
                for (int q = 0; q < NC; q++) sum[r][q] += aik * bk[q];
            }
        }
        memcpy(c + i0 * S, sum, sizeof(sum));
    }
}

/* t = a^T for one S x S block, in TT x TT tiles */
static void transpose_SFX(const REAL *restrict a, REAL *restrict t) {
    for (int i0 = 0; i0 < S; i0 += TT)
        for (int j0 = 0; j0 < S; j0 += TT) {
            REAL tile[TT][TT];
            for (int i = 0; i < TT; i++) memcpy(tile[i], a + (i0 + i) * S + j0, sizeof(tile[i]));
            for (int j = 0; j < TT; j++)
                for (int i = 0; i < TT; i++) t[(j0 + j) * S + i0 + i] = tile[i][j];
        }
}
"""

# Products along rays, one instance per (real type, block size S).
_RAYS = r"""
/* products along rays (Note [products along rays] in functional): items i in level order,
   R[dst_i] = R[left_i] @ R[right_i]; backward, items reversed, dR[left_i] += dR[dst_i] R[right_i]^T
   and dR[right_i] += R[left_i]^T dR[dst_i]. One task per (h, m): a task's items only read
   its own earlier results, so no level needs a barrier and no two tasks write one matrix. */
typedef struct {
    REAL *rot;              /* (H, N, M, S, S) contiguous                                */
    const REAL *grad;       /* backward: dL/dR, like rot; NULL forward                   */
    REAL *dbase;            /* backward: dL/dR of the tokens in base, (H, NB, M, S, S)   */
    const int64_t *dst, *left, *right, *base;
    int64_t L, H, N, M, NB;
} ray_ctx_SFX;

static void ray_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    const ray_ctx_SFX *c = (const ray_ctx_SFX *)vc;
    /* operands are copied into L1-sized buffers first: a product straight from the
       (h, n, m) rows of a large tensor stalled on every first touch, 4x slower */
    REAL *buf = (REAL *)alloc_vectors(sizeof(REAL) * (3 + (c->grad ? c->N : 0)) * S * S);
    if (!buf) abort();
    REAL *x = buf, *y = buf + S * S, *z = y + S * S, *scratch = z + S * S;
    for (int64_t hm = lo; hm < hi; hm++) {
        const int64_t h = hm / c->M, m = hm % c->M, row = c->M * S * S;
        REAL *rot = c->rot + h * c->N * row + m * S * S;
        if (!c->grad) {
            for (int64_t i = 0; i < c->L; i++) {
                memcpy(x, rot + c->left[i] * row, sizeof(REAL) * S * S);
                memcpy(y, rot + c->right[i] * row, sizeof(REAL) * S * S);
                gemm_SFX(x, y, z, 0);
                memcpy(rot + c->dst[i] * row, z, sizeof(REAL) * S * S);
            }
            continue;
        }
        /* backward: this (h, m)'s gradient rows copied into a scratch (L2-sized for dense
           heads), accumulated there, and only the base tokens' rows written out */
        for (int64_t n = 0; n < c->N; n++)
            memcpy(scratch + n * S * S, c->grad + (h * c->N + n) * row + m * S * S,
                   sizeof(REAL) * S * S);
        for (int64_t i = c->L - 1; i >= 0; i--) {
            REAL *gl = scratch + c->left[i] * S * S, *gr = scratch + c->right[i] * S * S;
            const REAL *gd = scratch + c->dst[i] * S * S;
            transpose_SFX(rot + c->right[i] * row, y);
            gemm_SFX(gd, y, gl, 1);  /* dR[left] += dR[dst] R[right]^T */
            transpose_SFX(rot + c->left[i] * row, y);
            gemm_SFX(y, gd, gr, 1);  /* dR[right] += R[left]^T dR[dst] */
        }
        for (int64_t i = 0; i < c->NB; i++)
            memcpy(c->dbase + ((h * c->NB + i) * c->M + m) * S * S,
                   scratch + c->base[i] * S * S, sizeof(REAL) * S * S);
    }
    free(buf);
}

void liere_rays_SFX(REAL *rot, const REAL *grad, REAL *dbase, const int64_t *base, int64_t NB,
                    const int64_t *dst, const int64_t *left, const int64_t *right, int64_t L,
                    int64_t H, int64_t N, int64_t M, int threads) {
    ray_ctx_SFX c;
    c.rot = rot; c.grad = grad; c.dbase = dbase; c.base = base; c.NB = NB;
    c.dst = dst; c.left = left; c.right = right; c.L = L; c.H = H; c.N = N; c.M = M;
    parallel_for(ray_range_SFX, &c, H * M, threads);
}
"""


# One instance per (real type, block size S). Layout letters as in liere.functional. The
# squarings work on LW matrices at once, one per vector lane ("structure of arrays"): every
# multiply-add is a full-width vector operation with no dependency between lanes.
_SQUARINGS = r"""
/* ---------------- SFX: REAL, S x S blocks ---------------- */

typedef REAL vec_SFX __attribute__((vector_size(sizeof(REAL) * LW)));
typedef IREAL ivec_SFX __attribute__((vector_size(sizeof(REAL) * LW)));

/* c = a @ b for LW matrices at once (GCC/Clang vector extensions: one lane per matrix) */
static inline void mm_SFX(const vec_SFX *restrict a, const vec_SFX *restrict b,
                          vec_SFX *restrict c) {
    for (int i = 0; i < S; i++) {
        vec_SFX acc[S];
        for (int j = 0; j < S; j++) acc[j] = a[i * S] * b[j];
        for (int k = 1; k < S; k++) {
            const vec_SFX aik = a[i * S + k];
            for (int j = 0; j < S; j++) acc[j] += aik * b[k * S + j];
        }
        for (int j = 0; j < S; j++) c[i * S + j] = acc[j];
    }
}

/* c = g @ s^T + s^T @ g (the cotangent of s @ s) for LW matrices at once */
static inline void sqback_SFX(const vec_SFX *restrict g, const vec_SFX *restrict s,
                              vec_SFX *restrict c) {
    for (int i = 0; i < S; i++) {
        vec_SFX acc[S];
        for (int j = 0; j < S; j++) acc[j] = g[i * S] * s[j * S] + s[i] * g[j];
        for (int k = 1; k < S; k++) {
            const vec_SFX gik = g[i * S + k], ski = s[k * S + i];
            for (int j = 0; j < S; j++) acc[j] += gik * s[j * S + k] + ski * g[k * S + j];
        }
        for (int j = 0; j < S; j++) c[i * S + j] = acc[j];
    }
}

/* r = mask ? x : r, lane-wise, for a whole block */
static inline void blend_SFX(vec_SFX *restrict r, const vec_SFX *restrict x, ivec_SFX mask) {
    for (int e = 0; e < S * S; e++)
        r[e] = (vec_SFX)(((ivec_SFX)x[e] & mask) | ((ivec_SFX)r[e] & ~mask));
}

SQ_CONTEXT

/* group idx = (h, m, LW consecutive tokens from n0): load entries lane-wise (padding
   lanes get the identity and no squaring) */
static int32_t sq_load_SFX(const sq_ctx_SFX *c, int64_t idx, vec_SFX *a, ivec_SFX *jv,
                           int64_t *h, int64_t *m, int64_t *n0, int *cnt) {
    const int64_t groups = (c->N + LW - 1) / LW, hm = idx / groups;
    int32_t top = 0;
    *n0 = (idx % groups) * LW; *m = hm % c->M; *h = hm / c->M;
    *cnt = (int)(c->N - *n0 < LW ? c->N - *n0 : LW);
    const REAL *src = c->t + *h * c->sh + *m * c->sm + *n0 * c->sn;
    for (int l = 0; l < LW; l++) {
        const int32_t j = l < *cnt ? c->sq[*n0 + l] : 0;
        (*jv)[l] = j;
        top = j > top ? j : top;
    }
    if (*cnt == LW && c->sn == 1) {
        for (int e = 0; e < S * S; e++) memcpy(&a[e], src + e * c->se, sizeof(vec_SFX));
    } else {
        for (int e = 0; e < S * S; e++)
            for (int l = 0; l < LW; l++)
                a[e][l] = l < *cnt ? src[e * c->se + l * c->sn] : (REAL)(e % (S + 1) == 0);
    }
    return top;
}

static void sq_fwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    const sq_ctx_SFX *c = (const sq_ctx_SFX *)vc;
    vec_SFX x[S * S], y[S * S], r[S * S];
    ivec_SFX jv;
    for (int64_t idx = lo; idx < hi; idx++) {
        int64_t h, m, n0;
        int cnt;
        const int32_t top = sq_load_SFX(c, idx, x, &jv, &h, &m, &n0, &cnt);
        vec_SFX *cur = x, *nxt = y, *tmp;
        memcpy(r, x, sizeof(r));
        for (int32_t level = 1; level <= top; level++) {
            mm_SFX(cur, cur, nxt);
            tmp = cur; cur = nxt; nxt = tmp;
            blend_SFX(r, cur, jv >= level);
        }
        for (int l = 0; l < cnt; l++) {
            REAL *dst = c->out + ((h * c->NO + row_SFX(c, n0 + l)) * c->M + m) * (S * S);
            for (int e = 0; e < S * S; e++) dst[e] = r[e][l];
        }
    }
}

static void sq_bwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    const sq_ctx_SFX *c = (const sq_ctx_SFX *)vc;
    vec_SFX *squares = (vec_SFX *)alloc_vectors(sizeof(vec_SFX) * S * S * MAXSQ);
    vec_SFX g[S * S], g2[S * S];
    ivec_SFX jv;
    if (!squares) abort();
    for (int64_t idx = lo; idx < hi; idx++) {
        int64_t h, m, n0;
        int cnt;
        const int32_t top = sq_load_SFX(c, idx, squares, &jv, &h, &m, &n0, &cnt);
        for (int32_t level = 1; level < top; level++)
            mm_SFX(squares + (level - 1) * S * S, squares + (level - 1) * S * S,
                   squares + level * S * S);
        for (int l = 0; l < LW; l++) {
            if (l >= cnt) { for (int e = 0; e < S * S; e++) g[e][l] = 0; continue; }
            const REAL *src = c->grad + ((h * c->NO + row_SFX(c, n0 + l)) * c->M + m) * (S * S);
            for (int e = 0; e < S * S; e++) g[e][l] = src[e];
        }
        for (int32_t level = top - 1; level >= 0; level--) {
            sqback_SFX(g, squares + level * S * S, g2);
            blend_SFX(g, g2, jv > level);
        }
        REAL *dst = c->out + h * c->sh + m * c->sm + n0 * c->sn;
        if (cnt == LW && c->sn == 1) {
            for (int e = 0; e < S * S; e++) memcpy(dst + e * c->se, &g[e], sizeof(vec_SFX));
        } else {
            for (int e = 0; e < S * S; e++)
                for (int l = 0; l < cnt; l++) dst[e * c->se + l * c->sn] = g[e][l];
        }
    }
    free(squares);
}

SQ_ENTRY(H * M * ((N + LW - 1) / LW))

"""

# Squarings for larger blocks (32, 64), one matrix at a time: a register-tiled product (RB rows
# of NC 64-byte vectors of accumulators), each matrix squared in L1/L2 and written once.
_SQUARINGS_LARGE = r"""
/* ---------------- SFX: REAL, S x S blocks, one matrix at a time ---------------- */

SQ_CONTEXT

static void load_matrix_SFX(const REAL *src, int64_t se, REAL *dst) {
    if (se == 1) { memcpy(dst, src, sizeof(REAL) * S * S); return; }
    for (int e = 0; e < S * S; e++) dst[e] = src[e * se];
}

static void sq_fwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    const sq_ctx_SFX *c = (const sq_ctx_SFX *)vc;
    REAL *buf = (REAL *)alloc_vectors(sizeof(REAL) * 2 * S * S);
    if (!buf) abort();
    for (int64_t idx = lo; idx < hi; idx++) {
        const int64_t n = idx % c->N, hm = idx / c->N, m = hm % c->M, h = hm / c->M;
        REAL *x = buf, *y = buf + S * S, *tmp;
        load_matrix_SFX(c->t + h * c->sh + m * c->sm + n * c->sn, c->se, x);
        for (int32_t l = 0; l < c->sq[n]; l++) { gemm_SFX(x, x, y, 0); tmp = x; x = y; y = tmp; }
        memcpy(c->out + ((h * c->NO + row_SFX(c, n)) * c->M + m) * (S * S), x,
               sizeof(REAL) * S * S);
    }
    free(buf);
}

static void sq_bwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    const sq_ctx_SFX *c = (const sq_ctx_SFX *)vc;
    REAL *buf = (REAL *)alloc_vectors(sizeof(REAL) * (MAXSQ + 3) * S * S);
    if (!buf) abort();
    REAL *squares = buf, *g = buf + MAXSQ * S * S, *g2 = g + S * S, *st = g2 + S * S, *tmp;
    for (int64_t idx = lo; idx < hi; idx++) {
        const int64_t n = idx % c->N, hm = idx / c->N, m = hm % c->M, h = hm / c->M;
        const int64_t off = h * c->sh + m * c->sm + n * c->sn;
        const int32_t j = c->sq[n];
        load_matrix_SFX(c->t + off, c->se, squares);
        for (int32_t l = 1; l < j; l++)
            gemm_SFX(squares + (l - 1) * S * S, squares + (l - 1) * S * S, squares + l * S * S, 0);
        memcpy(g, c->grad + ((h * c->NO + row_SFX(c, n)) * c->M + m) * (S * S),
               sizeof(REAL) * S * S);
        for (int32_t l = j - 1; l >= 0; l--) {  /* g <- g s^T + s^T g */
            transpose_SFX(squares + l * S * S, st);
            gemm_SFX(g, st, g2, 0);
            gemm_SFX(st, g, g2, 1);
            tmp = g; g = g2; g2 = tmp;
        }
        REAL *dst = c->out + off;
        if (c->se == 1) memcpy(dst, g, sizeof(REAL) * S * S);
        else for (int e = 0; e < S * S; e++) dst[e * c->se] = g[e];
    }
    free(buf);
}

SQ_ENTRY(H * M * N)

"""

# The blockwise application, one instance per (real type, block size S).
_APPLY = r"""
typedef struct {
    const REAL *x[2]; const int64_t *sx[2];  /* q, k: (B, Hh, T, D), any strides       */
    const REAL *g[2]; const int64_t *sg[2];  /* backward: dL/dq', dL/dk', any strides  */
    REAL *out[2];                            /* q', k' or dL/dq, dL/dk: contiguous     */
    const REAL *rot;                         /* (HR, N, M, S, S) contiguous            */
    REAL *drot;                              /* backward: dL/dR, same layout, or NULL  */
    int64_t B, Hh, T, P, M, HR;
} app_ctx_SFX;

/* rows of a block in chunks of CW lanes (one 64-byte vector), NC = S / CW chunks per row */
typedef REAL chunk_SFX __attribute__((vector_size(sizeof(REAL) * CW)));

static inline chunk_SFX loadc_SFX(const REAL *p) {
    chunk_SFX v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static void load_row_SFX(const REAL *x, int64_t stride, int64_t d, REAL *v) {
    if (stride == 1) { memcpy(v, x, sizeof(REAL) * d); return; }
    for (int64_t i = 0; i < d; i++) v[i] = x[i * stride];
}

/* y_r,m = sum_j v_r[m*S + j] * mat[m*S + j] for each block m and each of `cnt` <= RB rows r:
   mat holds, per block, S rows of NC chunks (columns of R forward, rows of R backward);
   every chunk of mat loaded once serves all rows of the tile */
static ALWAYS_INLINE void matvec_SFX(const chunk_SFX *restrict mat, const REAL *const *v,
                                     REAL *const *y, int cnt, int64_t M) {
    for (int64_t m = 0; m < M; m++) {
        const chunk_SFX *rows = mat + m * S * NC;
        chunk_SFX acc[RB][NC];
        for (int r = 0; r < RB; r++)
            for (int c = 0; c < NC; c++) acc[r][c] = rows[c] * (r < cnt ? v[r][m * S] : 0);
        for (int j = 1; j < S; j++)
            for (int r = 0; r < RB; r++) {
                const REAL vj = r < cnt ? v[r][m * S + j] : 0;
                for (int c = 0; c < NC; c++) acc[r][c] += rows[j * NC + c] * vj;
            }
        for (int r = 0; r < cnt; r++) memcpy(y[r] + m * S, acc[r], sizeof(acc[r]));
    }
}

/* dR_m[i, :] += sum_r g_r[m*S + i] x_r[m*S : m*S + S] over the `cnt` rows of a tile */
static ALWAYS_INLINE void outer_SFX(chunk_SFX *restrict dr, const REAL *const *g,
                                    const REAL *const *x, int cnt, int64_t M) {
    for (int64_t m = 0; m < M; m++) {
        chunk_SFX xm[RB][NC];
        for (int r = 0; r < RB; r++)
            for (int q = 0; q < NC; q++)
                xm[r][q] = r < cnt ? loadc_SFX(x[r] + m * S + q * CW) : (chunk_SFX){0};
        for (int i = 0; i < S; i++) {
            chunk_SFX *drow = dr + (m * S + i) * NC;
            for (int q = 0; q < NC; q++) {
                chunk_SFX sum = drow[q];
                for (int r = 0; r < RB; r++) sum += (r < cnt ? g[r][m * S + i] : 0) * xm[r][q];
                drow[q] = sum;
            }
        }
    }
}

/* one token per index, every row (b, h, t) of it, in tiles of RB batch elements: forward
   y = R x; backward dx = R^T g and dR = sum_b g x^T. Rows of one token sit a batch stride
   apart, so the next tile's rows are prefetched while this one is rotated. */
static ALWAYS_INLINE void app_range_SFX(const void *vc, int64_t lo, int64_t hi, int backward) {
    const app_ctx_SFX *c = (const app_ctx_SFX *)vc;
    const int64_t M = c->M, D = M * S, N = c->T - c->P, HR = c->HR, group = c->Hh / HR;
    const int64_t block = D * NC; /* chunks of one rotation head's blocks */
    const int need_x = !backward || c->drot;
    /* mats: columns (forward) or rows (backward) of every block of R per rotation head, in
       chunks; drs: dR likewise; rowbuf: rows made contiguous when strided */
    chunk_SFX *vbuf = (chunk_SFX *)alloc_vectors(sizeof(chunk_SFX) * 2 * HR * block);
    REAL *rowbuf = (REAL *)malloc(sizeof(REAL) * 2 * RB * D);
    if (!vbuf || !rowbuf) abort();
    chunk_SFX *mats = vbuf, *drs = vbuf + HR * block;
    for (int64_t n = lo; n < hi; n++) {
        const int64_t t = c->P + n;
        for (int64_t hr = 0; hr < HR; hr++) {
            const REAL *r = c->rot + (hr * N + n) * M * (S * S);
            if (!backward) {
                REAL *col = (REAL *)(mats + hr * block);
                for (int64_t m = 0; m < M; m++) transpose_SFX(r + m * S * S, col + m * S * S);
            } else {
                memcpy(mats + hr * block, r, sizeof(REAL) * M * S * S);
                if (c->drot) memset(drs + hr * block, 0, sizeof(chunk_SFX) * block);
            }
        }
        for (int64_t b0 = 0; b0 < c->B; b0 += RB) {
            const int cnt = (int)(c->B - b0 < RB ? c->B - b0 : RB);
            for (int64_t b = b0 + RB; b < b0 + 2 * RB && b < c->B; b++)  /* next tile */
                for (int w = 0; w < 2; w++)
                    for (int64_t h = 0; h < c->Hh; h++) {
                        const REAL *nx = c->x[w] + b * c->sx[w][0] + h * c->sx[w][1]
                                         + t * c->sx[w][2];
                        const REAL *ng = backward ? c->g[w] + b * c->sg[w][0]
                                                    + h * c->sg[w][1] + t * c->sg[w][2] : NULL;
                        for (int64_t o = 0; o < D; o += 64 / (int64_t)sizeof(REAL)) {
                            if (need_x) __builtin_prefetch(nx + o * c->sx[w][3]);
                            if (ng) __builtin_prefetch(ng + o * c->sg[w][3]);
                        }
                    }
            for (int64_t h = 0; h < c->Hh; h++) {
                const chunk_SFX *mat = mats + (h / group) * block;
                for (int w = 0; w < 2; w++) {
                    const REAL *xr[RB], *gr[RB];
                    REAL *yr[RB];
                    for (int r = 0; r < cnt; r++) {
                        const int64_t b = b0 + r, *sx = c->sx[w], *sg = c->sg[w];
                        xr[r] = c->x[w] + b * sx[0] + h * sx[1] + t * sx[2];
                        if (need_x && sx[3] != 1) {
                            load_row_SFX(xr[r], sx[3], D, rowbuf + r * D);
                            xr[r] = rowbuf + r * D;
                        }
                        yr[r] = c->out[w] ? c->out[w] + ((b * c->Hh + h) * c->T + t) * D : NULL;
                        if (backward) {
                            gr[r] = c->g[w] + b * sg[0] + h * sg[1] + t * sg[2];
                            if (sg[3] != 1) {
                                load_row_SFX(gr[r], sg[3], D, rowbuf + (RB + r) * D);
                                gr[r] = rowbuf + (RB + r) * D;
                            }
                        }
                    }
                    if (!backward) {  /* y_m = sum_j R_m[:, j] x_m[j] */
                        matvec_SFX(mat, xr, yr, cnt, M);
                        continue;
                    }
                    if (c->out[w]) matvec_SFX(mat, gr, yr, cnt, M);  /* dx_m = R_m^T g_m */
                    if (c->drot) outer_SFX(drs + (h / group) * block, gr, xr, cnt, M);
                }
            }
        }
        if (backward && c->drot)
            for (int64_t hr = 0; hr < HR; hr++)
                memcpy(c->drot + (hr * N + n) * M * (S * S), drs + hr * block,
                       sizeof(REAL) * D * S);
    }
    free(rowbuf);
    free(vbuf);
}

static void app_fwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    app_range_SFX(vc, lo, hi, 0);
}

static void app_bwd_range_SFX(const void *vc, int64_t lo, int64_t hi) {
    app_range_SFX(vc, lo, hi, 1);
}

/* prefix rows (b, h, t < P): copied from x (forward) or g (backward) */
static void app_prefix_range_SFX(const void *vc, int64_t lo, int64_t hi, int backward) {
    const app_ctx_SFX *c = (const app_ctx_SFX *)vc;
    const int64_t D = c->M * S;
    for (int64_t idx = lo; idx < hi; idx++) {
        const int64_t t = idx % c->P, h = (idx / c->P) % c->Hh, b = idx / (c->P * c->Hh);
        for (int w = 0; w < 2; w++) {
            const int64_t *s = backward ? c->sg[w] : c->sx[w];
            const REAL *x = (backward ? c->g[w] : c->x[w]) + b * s[0] + h * s[1] + t * s[2];
            load_row_SFX(x, s[3], D, c->out[w] + ((b * c->Hh + h) * c->T + t) * D);
        }
    }
}

static void app_prefix_fwd_SFX(const void *vc, int64_t lo, int64_t hi) {
    app_prefix_range_SFX(vc, lo, hi, 0);
}

static void app_prefix_bwd_SFX(const void *vc, int64_t lo, int64_t hi) {
    app_prefix_range_SFX(vc, lo, hi, 1);
}

void liere_apply_SFX(const REAL *q, const int64_t *sq, const REAL *k, const int64_t *sk,
                     const REAL *gq, const int64_t *sgq, const REAL *gk, const int64_t *sgk,
                     const REAL *rot, REAL *out_q, REAL *out_k, REAL *drot,
                     int64_t B, int64_t Hh, int64_t T, int64_t P, int64_t M, int64_t HR,
                     int backward, int threads) {
    app_ctx_SFX c;
    c.x[0] = q; c.x[1] = k; c.sx[0] = sq; c.sx[1] = sk;
    c.g[0] = gq; c.g[1] = gk; c.sg[0] = sgq; c.sg[1] = sgk;
    c.out[0] = out_q; c.out[1] = out_k; c.rot = rot; c.drot = drot;
    c.B = B; c.Hh = Hh; c.T = T; c.P = P; c.M = M; c.HR = HR;
    parallel_for(backward ? app_bwd_range_SFX : app_fwd_range_SFX, &c, T - P, threads);
    if (P > 0 && out_q)
        parallel_for(backward ? app_prefix_bwd_SFX : app_prefix_fwd_SFX, &c, B * Hh * P, threads);
}
"""

_REALS = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}
_INTS = {"float": "int32_t", "double": "int64_t"}
_REALS_BY_NAME = {"float": "f32", "double": "f64"}


def _instance(template: str, real: str, size: int) -> str:
    """``template`` for one real type and block size: ``SFX``, ``REAL``, ``IREAL`` and the
    size tokens ``S`` (block size), ``CW`` (lanes of a 64-byte vector), ``NC`` (vectors per
    block row), ``RB`` (rows per tile, so that ``RB * NC`` accumulators fit in registers) and
    ``TT`` (the side of a transposed tile) replaced."""
    tag = _REALS_BY_NAME[real]
    code = template.replace("SFX", f"{tag}_s{size}").replace("IREAL", _INTS[real])
    code = code.replace("REAL", real)
    lanes = min(size, 64 // (4 if real == "float" else 8))
    chunks = size // lanes
    rb = min(4, max(1, 16 // chunks))
    values = {"S": size, "CW": lanes, "NC": chunks, "RB": rb, "TT": min(size, 8)}
    return re.sub(
        r"(?<![A-Za-z0-9_])(S|CW|NC|RB|TT)(?![A-Za-z0-9_])", lambda t: str(values[t.group(1)]), code
    )


def _source() -> str:
    parts = [_COMMON, f"#define MAXSQ {MAX_SQUARINGS}\n#define LW {_LANES}\n"]
    for real in _INTS:
        small, large = _with_shared_pieces(_SQUARINGS), _with_shared_pieces(_SQUARINGS_LARGE)
        parts += [_instance(_GEMM, real, size) for size in sorted({*SIZES, *APPLY_SIZES})]
        parts += [_instance(small, real, size) for size in SIZES if size <= 16]
        parts += [_instance(large, real, size) for size in SIZES if size > 16]
        parts += [_instance(_RAYS, real, size) for size in RAY_SIZES]
        parts += [_instance(_APPLY, real, size) for size in APPLY_SIZES]
    return "\n".join(parts)


_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_fingerprint() -> str:
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if "flags" in info and "model name" in info:
                    break
    except OSError:
        pass
    return info


def _unsafe_directory(path: Path) -> str:
    """Why the library must not load from ``path`` (empty when it may): created if missing
    (mode 0700); it must be a directory of the current user, writable by no one else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        return f"cannot use the kernel cache {path}: {exc} (set LIERE_CACHE_DIR)"
    if not path.is_dir():
        return f"the kernel cache {path} is not a directory (set LIERE_CACHE_DIR)"
    if hasattr(os, "getuid"):
        if info.st_uid != os.getuid():
            return (
                f"the kernel cache {path} belongs to another user (uid {info.st_uid}); "
                f"set LIERE_CACHE_DIR to a directory of your own"
            )
        if info.st_mode & 0o022:
            return (
                f"the kernel cache {path} is writable by other users (mode "
                f"{info.st_mode & 0o777:o}); chmod go-w it or set LIERE_CACHE_DIR"
            )
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("LIERE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "liere"


def _compile(source: str) -> tuple[Optional[ctypes.CDLL], str]:
    compiler = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    attempts = [
        ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
        ["-O3", "-march=native", "-ffp-contract=fast"],
        ["-O3", "-ffp-contract=fast"],
    ]
    if _off(os.environ.get("LIERE_KERNELS_OPENMP", "1")):  # pthreads instead (tests)
        attempts = attempts[1:]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(
            "\0".join([source, compiler, *flags, _cpu_fingerprint(), sys.platform]).encode()
        ).hexdigest()[:20]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        cache = _cache_dir()
        unsafe = _unsafe_directory(cache)
        if unsafe:
            return None, unsafe
        lib = cache / f"kernels-{key}{suffix}"
        if not lib.exists():
            _LOG.warning(
                "liere: compiling its CPU kernels for this machine (once, about 10 s) into "
                "%s; `python -m liere.kernels` does this ahead of time, LIERE_KERNELS=0 "
                "turns them off",
                cache,
            )
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "kernels.c"
                src.write_text(source)
                built = Path(tmp) / f"kernels{suffix}"
                cmd = [compiler, *flags, "-std=gnu11", "-shared", "-fPIC", "-pthread"]
                cmd += [str(src), "-o", str(built)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{' '.join(cmd)}: {exc}")
                    continue
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
                    continue
                os.replace(built, lib)  # atomic: concurrent builders race harmlessly
        try:
            return ctypes.CDLL(str(lib)), ""
        except OSError as exc:
            errors.append(f"loading {lib}: {exc}")
    return None, "compiling the kernels failed: " + " | ".join(errors)


def _off(value: str) -> bool:
    return value.strip().lower() in ("0", "false", "no", "off")


def _library() -> Optional[ctypes.CDLL]:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            if _off(os.environ.get("LIERE_KERNELS", "1")):
                lib, reason = None, "disabled by LIERE_KERNELS=0"
            else:
                try:
                    lib, reason = _compile(_source())
                except OSError as exc:  # unwritable cache, ...
                    lib, reason = None, f"building the kernels failed: {exc}"
            _state["reason"] = reason
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the compiled kernels are built and loaded (Note [compiled kernels]); the first
    call compiles them (about a second), later calls are free."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False (empty when it is True)."""
    _library()
    return str(_state.get("reason", ""))


def status() -> str:
    """One line for logs and benchmark headers: ``"kernels on"`` or why they are off."""
    return "kernels on" if available() else f"kernels off ({unavailable_reason()})"


def usable(*tensors: Tensor, size: int, sizes: tuple[int, ...] = SIZES) -> bool:
    """Whether the kernels can serve these tensors: CPU, one dtype among float32/float64, a
    block size among ``sizes`` (``SIZES`` for the squarings, ``APPLY_SIZES`` for the
    application) and the kernels built. Callers skip the kernels while tracing
    (``functional.is_tracing``)."""
    if size not in sizes:
        return False
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or t.dtype not in _REALS:
            return False
    return available()


def _threads() -> int:
    return int(os.environ.get("LIERE_KERNEL_THREADS", torch.get_num_threads()))


def _fresh(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised contiguous tensor of ``like``'s dtype and device (``like``'s shape
    unless ``shape`` is given), from torch's allocator. (A pool of reused storages and
    ``madvise`` huge-page hints used to live here; both are gone: the pool needed a private
    torch API, and neither belongs in a library. Where page faults and zeroing of large
    buffers matter, preload jemalloc or tcmalloc, as PyTorch's CPU performance guide advises;
    docs/performance.md has the measurement.)"""
    size = tuple(shape) if shape else tuple(like.shape)
    return torch.empty(size, dtype=like.dtype, device=like.device)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _strides(t: Tensor) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _fn(kind: str, dtype: torch.dtype, size: int) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    lib = _library()
    assert lib is not None
    fn = getattr(lib, f"liere_{kind}_{_REALS[dtype][1]}_s{size}")
    if not getattr(fn, "_liere_typed", False):
        p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        if kind == "squarings":
            fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i, i]
        elif kind == "rays":
            fn.argtypes = [p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i]
        else:
            fn.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i, i]
        fn.restype = None
        fn._liere_typed = True
    return fn


# Layouts of a series the squarings read (token n, head h, block m, entry e = (i, j)):
#   "entry"     (s, s, h*m, N)  the 1-2 axis GEMM for blocks <= 8
#   "batch"     (N, h*m, s, s)  the 1-2 axis GEMM for larger blocks
#   "entry-hnm" (s, s, h*N*m)   the 3-axis Paterson-Stockmeyer series for blocks <= 8
LAYOUTS = ("entry", "batch", "entry-hnm")


def _series_strides(layout: str, s: int, h: int, m: int, n: int) -> tuple[int, ...]:
    """Strides (entry, head, block, token) of a contiguous series in ``layout``."""
    if layout == "entry":
        return (h * m * n, m * n, n, 1)
    if layout == "batch":
        return (1, m * s * s, s * s, h * m * s * s)
    if layout == "entry-hnm":
        return (h * n * m, n * m, 1, m)
    raise ValueError(f"unknown series layout {layout!r}; expected one of {LAYOUTS}")


def block_size_of(series: Tensor, layout: str) -> int:
    return int(series.shape[-1] if layout == "batch" else series.shape[0])


def squarings_forward(
    series: Tensor,
    squarings: Tensor,
    h: int,
    m: int,
    layout: str,
    out: Optional[Tensor] = None,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """``R[h, n, m] = T[h, m, n]^(2^squarings[n])`` (Note [compiled kernels]); with ``out``
    and ``rows``, token ``n`` is written to row ``rows[n]`` of ``out`` (other rows are left
    as they are).

    Shape:
        series contiguous in ``layout`` (``LAYOUTS``); squarings ``(N,)`` int32; rows ``(N,)``
        int64 -> ``(h, N, m, s, s)``, or ``out`` ``(h, N', m, s, s)`` contiguous
    """
    s, n = block_size_of(series, layout), squarings.shape[0]
    if out is None:
        out = _fresh(series, h, n, m, s, s)
    strides = (ctypes.c_int64 * 4)(*_series_strides(layout, s, h, m, n))
    _fn("squarings", series.dtype, s)(
        _ptr(series), strides, _ptr(squarings), None, _ptr(out), _ptr(rows), h, m, n,
        out.shape[1], 0, _threads(),
    )  # fmt: skip
    return out


def squarings_backward(
    series: Tensor,
    squarings: Tensor,
    grad: Tensor,
    h: int,
    m: int,
    layout: str,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """``dL/dT`` from ``dL/dR`` (``grad``, contiguous ``(h, N, m, s, s)``, or with ``rows``
    ``(h, N', m, s, s)`` with token ``n`` in row ``rows[n]``), laid out like ``series``."""
    s, n = block_size_of(series, layout), squarings.shape[0]
    out = _fresh(series)
    strides = (ctypes.c_int64 * 4)(*_series_strides(layout, s, h, m, n))
    _fn("squarings", series.dtype, s)(
        _ptr(series), strides, _ptr(squarings), _ptr(grad), _ptr(out), _ptr(rows), h, m, n,
        grad.shape[1], 1, _threads(),
    )  # fmt: skip
    return out


def apply_forward(q: Tensor, k: Tensor, rotations: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """``(R q, R k)`` block by block, the first ``p`` tokens copied (Note [compiled kernels]).

    Shape:
        q, k ``(b, h, p + n, d)`` (any strides); rotations ``(h | 1, n, m, s, s)`` contiguous
        -> two contiguous ``(b, h, p + n, d)``
    """
    b, heads, tokens, _ = q.shape
    hr, _, m, s, _ = rotations.shape
    out_q, out_k = _fresh(q), _fresh(k)
    _fn("apply", q.dtype, s)(
        _ptr(q), _strides(q), _ptr(k), _strides(k), None, None, None, None,
        _ptr(rotations), _ptr(out_q), _ptr(out_k), None, b, heads, tokens, p, m, hr, 0,
        _threads(),
    )  # fmt: skip
    return out_q, out_k


def apply_backward(
    q: Tensor,
    k: Tensor,
    rotations: Tensor,
    grad_q: Tensor,
    grad_k: Tensor,
    p: int,
    need_inputs: bool,
    need_rotations: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``apply_forward`` for q, k (``R^T g``, prefix copied) and the rotations
    (``sum g x^T`` over the batch and the heads sharing a rotation)."""
    b, heads, tokens, _ = q.shape
    hr, _, m, s, _ = rotations.shape
    d_q = d_k = d_rot = None
    if need_inputs:
        d_q, d_k = _fresh(grad_q), _fresh(grad_k)
    if need_rotations:
        d_rot = _fresh(rotations)
    _fn("apply", q.dtype, s)(
        _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(grad_q), _strides(grad_q),
        _ptr(grad_k), _strides(grad_k), _ptr(rotations), _ptr(d_q), _ptr(d_k), _ptr(d_rot),
        b, heads, tokens, p, m, hr, 1, _threads(),
    )  # fmt: skip
    return d_q, d_k, d_rot


def ray_products_forward(rotations: Tensor, dst: Tensor, left: Tensor, right: Tensor) -> None:
    """In place, item by item: ``R[:, dst_i] = R[:, left_i] @ R[:, right_i]`` (Note [products
    along rays] in ``functional``); items in level order (a token is written before it is
    read).

    Shape:
        rotations ``(h, n, m, s, s)`` contiguous, ``s`` in ``RAY_SIZES``; dst, left, right
        ``(L,)`` int64
    """
    h, n, m, s, _ = rotations.shape
    _fn("rays", rotations.dtype, s)(
        _ptr(rotations), None, None, None, 0, _ptr(dst), _ptr(left), _ptr(right), dst.shape[0],
        h, n, m, _threads(),
    )  # fmt: skip


def ray_products_backward(
    rotations: Tensor, grad: Tensor, base: Tensor, dst: Tensor, left: Tensor, right: Tensor
) -> Tensor:
    """The gradient of the tokens in ``base`` (computed directly) from that of every token
    (``grad``, contiguous like ``rotations``), items reversed:
    ``G[:, left_i] += G[:, dst_i] R[:, right_i]^T``, ``G[:, right_i] += R[:, left_i]^T G[:, dst_i]``
    (``grad`` itself is not modified).

    Shape:
        rotations, grad ``(h, n, m, s, s)``; base ``(nb,)`` int64 -> ``(h, nb, m, s, s)``
    """
    h, n, m, s, _ = rotations.shape
    d_base = _fresh(grad, h, base.shape[0], m, s, s)
    _fn("rays", rotations.dtype, s)(
        _ptr(rotations), _ptr(grad), _ptr(d_base), _ptr(base), base.shape[0], _ptr(dst),
        _ptr(left), _ptr(right), dst.shape[0], h, n, m, _threads(),
    )  # fmt: skip
    return d_base


def main() -> int:
    """``python -m liere.kernels``: build (or find) the kernels and say so."""
    logging.basicConfig(format="%(message)s")
    print(f"liere kernels: {status()}")
    return 0 if available() else 1


if __name__ == "__main__":
    sys.exit(main())
