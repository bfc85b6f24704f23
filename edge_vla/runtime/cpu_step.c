/* The Euler loop of edge-vla's FP32 step graph (export/onnx_graphs.py FoldedStep) in one C call (issue 28).
 *
 * onnxruntime runs the tiny step graph as ~65 kernels of a few microseconds each (14 GEMMs with M = 8 rows at
 * 50-95 GFLOP/s, attention products of ~3.5 us, ~0.4 us of executor per node). Here one call runs every step of a
 * chunk: the GEMMs keep an 8-row x NB-column accumulator tile in registers and stream each packed weight panel
 * once; LayerNorm, softmax, GELU, the adaLN gates and the residual adds run in the loops around them; the scratch
 * is the caller's, allocated once. edge_vla/runtime/cpu_step.py reads the weights out of the bundle's step graph,
 * packs them, checks this code against onnxruntime at load time, and falls back to onnxruntime when anything
 * differs.
 *
 * Portable C11 with GCC/Clang vector extensions (no intrinsics): the same source builds for x86 (AVX-512, AVX2,
 * SSE) and aarch64 (NEON, e.g. Jetson); the vector width and tile are picked from the target's macros.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EV_ABI 1

/* Vector width VW (floats) and vectors per tile row NV: MR x NV accumulators must fit the register file with room
 * for the weight vectors (AVX-512: 32 registers, 16 accumulators; AVX/SSE: 16 registers, 8; NEON: 32, 16). */
#if defined(__AVX512F__)
#define VW 16
#define NV 2
#elif defined(__AVX__)
#define VW 8
#define NV 1
#elif defined(__aarch64__) || defined(__ARM_NEON)
#define VW 4
#define NV 2
#else
#define VW 4
#define NV 1
#endif
#define NB (VW * NV) /* panel width: the packed weights' column block */
#define MR 8         /* rows per register tile (the action chunk's tokens) */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(float))));

/* memcpy: unaligned loads and stores without aliasing questions; compilers emit one vector move. */
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float s) { vf v = {0}; return v + s; }
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }

/* Horizontal sum and max as trees (log2(VW) dependent steps, not VW - 1): a softmax or LayerNorm row is short
 * enough that a sequential reduction's latency would cost as much as the row's arithmetic. */
static inline float hsum(vf v) {
    float t[VW];
    memcpy(t, &v, sizeof t);
    for (int w = VW / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

static inline float hmax(vf v) {
    float t[VW];
    memcpy(t, &v, sizeof t);
    for (int w = VW / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] = t[i + w] > t[i] ? t[i + w] : t[i];
    return t[0];
}

/* exp(x), Cephes' single-precision polynomial (~1 ulp): round(x / ln 2) by the 1.5 * 2^23 trick, x - n ln 2 in two
 * parts, degree-6 polynomial, 2^n by building the exponent bits. Clamped so that 2^n stays a normal float. */
static inline vf vexp(vf x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits */
    x = vmin(vmax(x, vsplat(-87.0f)), vsplat(88.0f));
    vf t = x * 1.44269504088896341f + magic;
    vi n = (vi)t - 0x4B400000;
    vf fn = t - magic;
    vf r = x - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    vf y = vsplat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    return y * (vf)((n + 127) << 23);
}

/* ---- the small-M GEMM: C[M, N] (op)= A[M, K] . W[K, N] + bias ------------------------------------------------
 * W is packed in panels of NB columns: panel p holds W[k][p*NB + j] at (p*K + k)*NB + j, zero-padded past N, so a
 * tile reads one contiguous stream. The bias (if any) is zero-padded to a whole number of panels. */
enum { EPI_STORE = 0, EPI_ADD = 1, EPI_GATE_ADD = 2, EPI_GELU = 3 };

typedef struct {
    int mode;          /* EPI_*: C = acc | C += acc | C += gate * acc | C = gelu(acc) */
    const float *gate; /* EPI_GATE_ADD: [N] */
    float ga, gb;      /* EPI_GELU: u * sigmoid(u * (ga + gb * u^2)), tanh-GELU's sigmoid form */
} epi_t;

static inline __attribute__((always_inline)) vf epilogue(const epi_t *e, vf acc, vf old, vf gate) {
    switch (e->mode) {
    case EPI_ADD:
        return old + acc;
    case EPI_GATE_ADD:
        return old + gate * acc;
    case EPI_GELU: {
        vf z = acc * (e->ga + e->gb * (acc * acc));
        return acc * (1.0f / (1.0f + vexp(-z)));
    }
    default:
        return acc;
    }
}

/* One tile: mr (a compile-time constant after inlining) rows x one panel; nc valid columns of NB. */
static inline __attribute__((always_inline)) void tile(const int mr, int K, const float *A, int lda, const float *W,
                                                       const float *bias, float *C, int ldc, int nc, const epi_t *e,
                                                       const float *gate) {
    vf acc[MR][NV];
    for (int v = 0; v < NV; v++) {
        vf b = bias ? vload(bias + v * VW) : vsplat(0.0f);
        for (int r = 0; r < mr; r++) acc[r][v] = b;
    }
    for (int k = 0; k < K; k++) {
        vf w[NV];
        for (int v = 0; v < NV; v++) w[v] = vload(W + (size_t)k * NB + v * VW);
        for (int r = 0; r < mr; r++) {
            const float a = A[(size_t)r * lda + k];
            for (int v = 0; v < NV; v++) acc[r][v] += a * w[v];
        }
    }
    const int needs_old = e->mode == EPI_ADD || e->mode == EPI_GATE_ADD;
    if (nc == NB) {
        vf g[NV];
        for (int v = 0; v < NV; v++) g[v] = e->mode == EPI_GATE_ADD ? vload(gate + v * VW) : vsplat(0.0f);
        for (int r = 0; r < mr; r++) {
            for (int v = 0; v < NV; v++) {
                float *c = C + (size_t)r * ldc + v * VW;
                vf old = needs_old ? vload(c) : vsplat(0.0f);
                vstore(c, epilogue(e, acc[r][v], old, g[v]));
            }
        }
        return;
    }
    /* A partial panel (N not a multiple of NB): through buffers, so nothing past column N is read or written. */
    float gbuf[NB] = {0}, obuf[NB], rbuf[NB];
    if (e->mode == EPI_GATE_ADD) memcpy(gbuf, gate, (size_t)nc * sizeof(float));
    for (int r = 0; r < mr; r++) {
        float *c = C + (size_t)r * ldc;
        memset(obuf, 0, sizeof obuf);
        if (needs_old) memcpy(obuf, c, (size_t)nc * sizeof(float));
        for (int v = 0; v < NV; v++)
            vstore(rbuf + v * VW, epilogue(e, acc[r][v], vload(obuf + v * VW), vload(gbuf + v * VW)));
        memcpy(c, rbuf, (size_t)nc * sizeof(float));
    }
}

static void gemm(int M, int K, int N, const float *A, int lda, const float *Wp, const float *bias, float *C, int ldc,
                 const epi_t *e) {
    const int panels = (N + NB - 1) / NB;
    for (int p = 0; p < panels; p++) {
        const float *W = Wp + (size_t)p * K * NB;
        const float *b = bias ? bias + (size_t)p * NB : NULL;
        const float *g = e->gate ? e->gate + (size_t)p * NB : NULL;
        const int nc = N - p * NB < NB ? N - p * NB : NB;
        int r = 0;
        for (; r + MR <= M; r += MR)
            tile(MR, K, A + (size_t)r * lda, lda, W, b, C + (size_t)r * ldc + p * NB, ldc, nc, e, g);
        for (; r < M; r++) tile(1, K, A + (size_t)r * lda, lda, W, b, C + (size_t)r * ldc + p * NB, ldc, nc, e, g);
    }
}

static const epi_t STORE = {EPI_STORE, NULL, 0.0f, 0.0f};

/* ---- the rest of the step ------------------------------------------------------------------------------------- */
static float row_sum(const float *x, int n) {
    vf acc = vsplat(0.0f);
    int i = 0;
    for (; i + VW <= n; i += VW) acc += vload(x + i);
    float s = hsum(acc);
    for (; i < n; i++) s += x[i];
    return s;
}

/* LayerNormalization over the last axis (two-pass mean and variance), y = (x - mean) / sqrt(var + eps) * scale +
 * shift; scale and shift are the time row's (1 + scale, shift) slices or the cross-attention norm's constants. */
static void layer_norm(int T, int E, const float *x, float *y, const float *scale, const float *shift, float eps) {
    for (int r = 0; r < T; r++) {
        const float *xr = x + (size_t)r * E;
        float *yr = y + (size_t)r * E;
        const float mean = row_sum(xr, E) / (float)E;
        vf acc = vsplat(0.0f);
        int c = 0;
        for (; c + VW <= E; c += VW) {
            vf d = vload(xr + c) - mean;
            acc += d * d;
        }
        float var = hsum(acc);
        for (; c < E; c++) var += (xr[c] - mean) * (xr[c] - mean);
        const float rstd = 1.0f / sqrtf(var / (float)E + eps);
        for (c = 0; c < E; c++) yr[c] = (xr[c] - mean) * rstd * scale[c] + shift[c];
    }
}

/* Softmax over the n entries of a row whose storage runs on to a whole number of vectors (the scores' rows are
 * padded to NB): the last vector is read and written whole, its lanes past n masked out (-inf before the max, 0
 * after the exp), so no row goes through scalar code. */
static void softmax_row(float *s, int n) {
    vi lanes;
    for (int j = 0; j < VW; j++) lanes[j] = j;
    const vf ninf = vsplat(-INFINITY), zero = vsplat(0.0f);
    vf m = ninf;
    for (int i = 0; i < n; i += VW) m = vmax(m, vselect(lanes < n - i, vload(s + i), ninf));
    const float mx = hmax(m);
    vf acc = zero;
    for (int i = 0; i < n; i += VW) {
        vf e = vselect(lanes < n - i, vexp(vload(s + i) - mx), zero);
        vstore(s + i, e);
        acc += e;
    }
    const float inv = 1.0f / hsum(acc);
    for (int i = 0; i < n; i += VW) vstore(s + i, vload(s + i) * inv);
}

/* ---- the model, as cpu_step.py lays it out (ctypes mirrors these structs field by field) --------------------- */
typedef struct {
    const float *w_qkv, *b_qkv, *w_o, *b_o, *ln_w, *ln_b, *w_q, *b_q, *w_co, *b_co, *w_1, *b_1, *w_2, *b_2;
    int32_t shift1, scale1, gate1, shift2, scale2, gate2; /* offsets into the time row */
} ev_block;

typedef struct {
    const float *w_in, *b_in, *pos, *prefix_emb, *w_out, *b_out;
    const ev_block *blocks;
    float *work;
    int64_t work_floats;
    int32_t abi, T, D, E, H, L, P, F, R, shift, scale;
    float eps, gelu_a, gelu_b;
} ev_model;

typedef struct {
    float *h, *a, *big, *q, *y, *s, *v, *kt, *vp, *kts, *vps;
    int dh, ppad, tpad, dpad;
} ws_t;

static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* The scratch layout; fills w's pointers when base is given. Returns the floats needed. */
static int64_t layout(const ev_model *m, ws_t *w, float *base) {
    const int64_t T = m->T, E = m->E, H = m->H, L = m->L, P = m->P, F = m->F, D = m->D;
    const int64_t dh = E / H, ppad = round_up(P, NB), tpad = round_up(T, NB), dpad = round_up(dh, NB);
    const int64_t big = T * (3 * E > F ? 3 * E : F), s = T * (ppad > tpad ? ppad : tpad);
    const int64_t sizes[11] = {T * E, T * E, big, T * E, T * E, s, T * D, L * H * dh * ppad, L * H * P * dpad,
                               dh * tpad, T * dpad};
    float **slots[11] = {&w->h, &w->a, &w->big, &w->q, &w->y, &w->s, &w->v, &w->kt, &w->vp, &w->kts, &w->vps};
    int64_t at = 0;
    for (int i = 0; i < 11; i++) {
        if (base) *slots[i] = base + at;
        at += round_up(sizes[i], 16); /* 64-byte aligned regions when the base is */
    }
    w->dh = (int)dh;
    w->ppad = (int)ppad;
    w->tpad = (int)tpad;
    w->dpad = (int)dpad;
    return at;
}

/* Panel p, row k, lane j of dst = src[(p*NB + j) * stride + k] for the ncols valid columns: a GEMM's right-hand
 * side taken from rows of src (K^T from K). The lanes past ncols are left alone: zero_tail zeroes them once. */
static void pack_transposed(const float *src, int stride, int ncols, int K, float *dst) {
    for (int col = 0; col < ncols; col++) {
        float *d = dst + (size_t)(col / NB) * K * NB + col % NB;
        const float *s = src + (size_t)col * stride;
        for (int k = 0; k < K; k++) d[(size_t)k * NB] = s[k];
    }
}

/* Zero the lanes past ncols in the last panel of a packed [K, ncols] right-hand side. */
static void zero_tail(int ncols, int K, float *dst) {
    if (ncols % NB)
        for (int k = 0; k < K; k++)
            memset(dst + ((size_t)(ncols / NB) * K + k) * NB + ncols % NB, 0, (size_t)(NB - ncols % NB) * sizeof(float));
}

/* Panel p, row k, lane j of dst = src[k * stride + p*NB + j]: a [K, ncols] matrix (V) in panels, zero-padded. */
static void pack_rows(const float *src, int stride, int ncols, int K, float *dst) {
    for (int p = 0; p * NB < ncols; p++) {
        const int n = ncols - p * NB < NB ? ncols - p * NB : NB;
        for (int k = 0; k < K; k++) {
            float *d = dst + ((size_t)p * K + k) * NB;
            memcpy(d, src + (size_t)k * stride + p * NB, (size_t)n * sizeof(float));
            if (n < NB) memset(d + n, 0, (size_t)(NB - n) * sizeof(float));
        }
    }
}

/* softmax(q k^T) v per head; q [T, E] at column h*dh (row stride ldq), K^T and V packed; out [T, E] at h*dh. */
static void attend(const ev_model *m, ws_t *w, const float *q, int ldq, const float *kt, const float *vp, int keys,
                   int spad, int head) {
    const int T = m->T, dh = w->dh;
    gemm(T, dh, keys, q + (size_t)head * dh, ldq, kt, NULL, w->s, spad, &STORE);
    for (int r = 0; r < T; r++) softmax_row(w->s + (size_t)r * spad, keys);
    gemm(T, keys, dh, w->s, spad, vp, NULL, w->y + (size_t)head * dh, m->E, &STORE);
}

static void step(const ev_model *m, ws_t *w, const float *x, const float *row, const float *mask, float *vel) {
    const int T = m->T, E = m->E, H = m->H, D = m->D, F = m->F, dh = w->dh;
    const epi_t add = {EPI_ADD, NULL, 0.0f, 0.0f};
    /* h = (x W_in + b_in) + pos [+ mask * prefix_emb] */
    memcpy(w->h, m->pos, (size_t)T * E * sizeof(float));
    gemm(T, D, E, x, D, m->w_in, m->b_in, w->h, E, &add);
    if (m->prefix_emb && mask)
        for (int r = 0; r < T; r++)
            for (int c = 0; c < E; c++) w->h[(size_t)r * E + c] += mask[r] * m->prefix_emb[c];
    for (int i = 0; i < m->L; i++) {
        const ev_block *b = &m->blocks[i];
        /* self-attention over the action tokens, gated residual */
        layer_norm(T, E, w->h, w->a, row + b->scale1, row + b->shift1, m->eps);
        gemm(T, E, 3 * E, w->a, E, b->w_qkv, b->b_qkv, w->big, 3 * E, &STORE);
        for (int hd = 0; hd < H; hd++) {
            const float *k = w->big + E + (size_t)hd * dh, *v = w->big + 2 * E + (size_t)hd * dh;
            pack_transposed(k, 3 * E, T, dh, w->kts);
            pack_rows(v, 3 * E, dh, T, w->vps);
            attend(m, w, w->big, 3 * E, w->kts, w->vps, T, w->tpad, hd);
        }
        const epi_t gate1 = {EPI_GATE_ADD, row + b->gate1, 0.0f, 0.0f};
        gemm(T, E, E, w->y, E, b->w_o, b->b_o, w->h, E, &gate1);
        /* cross-attention to the prefix's K/V (packed once per chunk), plain residual */
        layer_norm(T, E, w->h, w->a, b->ln_w, b->ln_b, m->eps);
        gemm(T, E, E, w->a, E, b->w_q, b->b_q, w->q, E, &STORE);
        for (int hd = 0; hd < H; hd++) {
            const float *kt = w->kt + ((size_t)i * H + hd) * dh * w->ppad;
            const float *vp = w->vp + ((size_t)i * H + hd) * m->P * w->dpad;
            attend(m, w, w->q, E, kt, vp, m->P, w->ppad, hd);
        }
        gemm(T, E, E, w->y, E, b->w_co, b->b_co, w->h, E, &add);
        /* MLP with tanh-GELU, gated residual */
        layer_norm(T, E, w->h, w->a, row + b->scale2, row + b->shift2, m->eps);
        const epi_t gelu = {EPI_GELU, NULL, m->gelu_a, m->gelu_b};
        gemm(T, E, F, w->a, E, b->w_1, b->b_1, w->big, F, &gelu);
        const epi_t gate2 = {EPI_GATE_ADD, row + b->gate2, 0.0f, 0.0f};
        gemm(T, F, E, w->big, F, b->w_2, b->b_2, w->h, E, &gate2);
    }
    layer_norm(T, E, w->h, w->a, row + m->scale, row + m->shift, m->eps);
    gemm(T, E, D, w->a, E, m->w_out, m->b_out, vel, D, &STORE);
}

int ev_abi(void) { return EV_ABI; }

int ev_panel_width(void) { return NB; }

int64_t ev_work_floats(const ev_model *m) {
    ws_t w;
    return layout(m, &w, NULL);
}

/* kv: the prefix graph's outputs [k_0, v_0, k_1, v_1, ...], each [1, H, P, dh]; rows: [steps, R], the time row of
 * each step; mask: [T] (RTC bundles) or NULL; x: [T, D], the noise in, the state after `steps` Euler steps out.
 * Returns 0, or a negative code for a model this build cannot run (checked before anything is written). */
int ev_chunk(const ev_model *m, const float *const *kv, const float *rows, int32_t steps, float dt,
             const float *mask, float *x) {
    if (!m || m->abi != EV_ABI) return -1;
    if (m->T < 1 || m->D < 1 || m->H < 1 || m->E < m->H || m->E % m->H || m->L < 0 || m->P < 1 || m->F < 1)
        return -2;
    ws_t w;
    if (layout(m, &w, m->work) > m->work_floats) return -3;
    zero_tail(m->T, w.dh, w.kts); /* the self-attention keys' padding, never written by the steps */
    for (int i = 0; i < m->L; i++)
        for (int hd = 0; hd < m->H; hd++) {
            const size_t head = (size_t)hd * m->P * w.dh;
            float *kt = w.kt + ((size_t)i * m->H + hd) * w.dh * w.ppad;
            pack_transposed(kv[2 * i] + head, w.dh, m->P, w.dh, kt);
            zero_tail(m->P, w.dh, kt);
            pack_rows(kv[2 * i + 1] + head, w.dh, w.dh, m->P, w.vp + ((size_t)i * m->H + hd) * m->P * w.dpad);
        }
    const int n = m->T * m->D;
    for (int s = 0; s < steps; s++) {
        step(m, &w, x, rows + (size_t)s * m->R, mask, w.v);
        for (int i = 0; i < n; i++) {
            const float dx = w.v[i] * dt; /* the sampler's order: v * dt, then x + that */
            x[i] += dx;
        }
    }
    return 0;
}
