// Math shared by the device kernels and their host (CPU) references.
//
// Every function here is `__host__ __device__` under nvcc/NVRTC and plain `inline` under g++, so the
// CPU references in each .cu and the host unit tests (tests/kernels/test_host_math.py) run the exact
// same expressions as the GPU. Keep it free of CUDA-only intrinsics: no __expf/__cosf (fast-math
// variants lose accuracy for the time embedding, whose argument reaches 100 rad).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define EV_HD __host__ __device__ __forceinline__
#else
#define EV_HD inline
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

// ln(10000), the base of the sinusoidal frequencies.
#define EV_LN_10000 9.210340371976184f
// Scale on t before the sinusoid (t in [0, 1] -> argument up to 100 rad).
#define EV_TIME_SCALE 100.0f
#define EV_LN_EPS 1e-6f

// Integrator modes of the fused step (ode_step.cu). Values are part of the loader ABI.
#define EV_MODE_INIT 0          // no update: x_in <- x, temb <- temb(t_next)
#define EV_MODE_EULER 1         // x <- x + dt v
#define EV_MODE_HEUN_PREDICT 2  // v_prev <- v; x_in <- x + dt v (x itself unchanged)
#define EV_MODE_HEUN_CORRECT 3  // x <- x + dt/2 (v_prev + v)

// Activations applied in the adaLN-linear epilogue. Values are part of the loader ABI.
#define EV_ACT_NONE 0
#define EV_ACT_GELU_TANH 1
#define EV_ACT_SILU 2

// Frequency i of the embedding: f_i = exp(-ln(10000) * i / half).
EV_HD float ev_time_freq(int i, int half) { return expf(-EV_LN_10000 * (float)i / (float)half); }

// Element j of temb(t) = concat(cos(100 t f), sin(100 t f)), length E (E even).
EV_HD float ev_time_embed_elem(float t, int j, int E) {
    const int half = E / 2;
    const int i = j < half ? j : j - half;
    const float arg = EV_TIME_SCALE * t * ev_time_freq(i, half);
    return j < half ? cosf(arg) : sinf(arg);
}

EV_HD float ev_euler(float x, float v, float dt) { return fmaf(dt, v, x); }

// Heun's corrector from the two slopes at (x, t) and (x + dt v0, t + dt).
EV_HD float ev_heun(float x, float v0, float v1, float dt) { return fmaf(0.5f * dt, v0 + v1, x); }

// Clamp that propagates NaN (fminf/fmaxf would silently turn a NaN action into a bound).
EV_HD float ev_clamp(float x, float lo, float hi) {
    if (x != x) return x;
    return x < lo ? lo : (x > hi ? hi : x);
}

EV_HD float ev_silu(float x) { return x / (1.0f + expf(-x)); }

EV_HD float ev_gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

EV_HD float ev_activation(float x, int act) {
    if (act == EV_ACT_GELU_TANH) return ev_gelu_tanh(x);
    if (act == EV_ACT_SILU) return ev_silu(x);
    return x;
}

// adaLN modulation of a normalised value: xhat * (1 + scale) + shift.
EV_HD float ev_modulate(float xhat, float shift, float scale) { return fmaf(xhat, 1.0f + scale, shift); }

// Two-pass LayerNorm statistics of one row (serial; used by the CPU references and the naive kernel).
// Two passes instead of E[x^2]-E[x]^2: rows are short (E <= 1024) and the residual stream can carry a
// large mean, where the one-pass formula cancels catastrophically in fp32.
EV_HD void ev_row_stats(const float* x, int n, float eps, float* mean_out, float* rstd_out) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += x[i];
    const float mean = s / (float)n;
    float ss = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float d = x[i] - mean;
        ss = fmaf(d, d, ss);
    }
    *mean_out = mean;
    *rstd_out = 1.0f / sqrtf(ss / (float)n + eps);
}
