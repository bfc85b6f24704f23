// Fused flow-matching integrator step for a whole action chunk, in one launch.
//
// Flow convention: x_0 = noise, x_1 = data, integrate t: 0 -> 1 in N steps, dt = 1/N.
//   Euler: x <- x + dt v(x, t)
//   Heun:  x_pred = x + dt v(x, t);  x <- x + dt/2 (v(x, t) + v(x_pred, t + dt))
// Between two model evaluations the runtime needs: the state update, optional clamping to the
// per-dim bounds, the next model input (often fp16), and the time embedding for the next t. Unfused
// that is 3-8 tiny kernels (ONNX/PyTorch: arange, exp, mul, cos, sin, concat, axpy, clip); here it
// is one. State x stays fp32 across steps; only engine-facing buffers take the storage type VT.
//
// Versions (llm.c habit):
//   v1: unfused baseline, one kernel per operation (time_embed_v1, axpy_v1, clamp_v1).
//   v2: fused, one block, all modes (init / Euler / Heun predict / Heun correct) in one launch.
//   schedule: temb for every t of a fixed schedule at once (precompute at load, not per step).
//
// Build: see kernels/Makefile. Standalone benchmark:
//   nvcc -O3 -arch=sm_90 -DEV_STANDALONE kernels/ode_step.cu -o build/kernels/ode_step && build/kernels/ode_step
// Host CPU reference only (used by tests through ctypes):
//   g++ -O2 -shared -fPIC -x c++ kernels/ode_step.cu -o libev_ode_step.so

#include "ode_math.cuh"

// ----------------------------------------------------------------------------------------------
// CPU reference (same math as the kernel, fp32 storage)

#if !defined(__CUDACC_RTC__)
extern "C" void ode_step_cpu(float* x, const float* v, float* v_prev, float* x_in, float* temb,
                             const float* lo, const float* hi, int n, int D, int E, float dt,
                             float t_next, int mode) {
    for (int i = 0; i < n; ++i) {
        float xi = x[i];
        float xo = xi;  // value handed to the next model evaluation
        if (mode == EV_MODE_EULER) {
            xi = ev_euler(xi, v[i], dt);
            if (lo) xi = ev_clamp(xi, lo[i % D], hi[i % D]);
            xo = xi;
        } else if (mode == EV_MODE_HEUN_PREDICT) {
            v_prev[i] = v[i];
            xo = ev_euler(xi, v[i], dt);
            if (lo) xo = ev_clamp(xo, lo[i % D], hi[i % D]);
        } else if (mode == EV_MODE_HEUN_CORRECT) {
            xi = ev_heun(xi, v_prev[i], v[i], dt);
            if (lo) xi = ev_clamp(xi, lo[i % D], hi[i % D]);
            xo = xi;
        }
        x[i] = xi;
        if (x_in) x_in[i] = xo;
    }
    if (temb)
        for (int j = 0; j < E; ++j) temb[j] = ev_time_embed_elem(t_next, j, E);
}

extern "C" void time_embed_cpu(float* out, float t, int E) {
    for (int j = 0; j < E; ++j) out[j] = ev_time_embed_elem(t, j, E);
}
#endif

// ----------------------------------------------------------------------------------------------
// Kernels

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include "ev_dtype.cuh"

// v2: fused step. Launch one block of >= max(n, E) threads (rounded to 32); the grid-stride loop
// keeps it correct for any launch shape. Null pointers switch parts off (no clamping, no temb...).
template <typename VT>
__device__ __forceinline__ void ode_step_v2_body(float* __restrict__ x, const VT* __restrict__ v,
                                                 float* __restrict__ v_prev, VT* __restrict__ x_in,
                                                 VT* __restrict__ temb, const float* __restrict__ lo,
                                                 const float* __restrict__ hi, int n, int D, int E,
                                                 float dt, float t_next, int mode) {
    const int total = n > E ? n : E;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        if (i < n) {
            float xi = x[i];
            float xo = xi;
            if (mode == EV_MODE_EULER) {
                xi = ev_euler(xi, ev_ld(v + i), dt);
                if (lo) xi = ev_clamp(xi, lo[i % D], hi[i % D]);
                xo = xi;
                x[i] = xi;
            } else if (mode == EV_MODE_HEUN_PREDICT) {
                const float vi = ev_ld(v + i);
                v_prev[i] = vi;
                xo = ev_euler(xi, vi, dt);
                if (lo) xo = ev_clamp(xo, lo[i % D], hi[i % D]);
            } else if (mode == EV_MODE_HEUN_CORRECT) {
                xi = ev_heun(xi, v_prev[i], ev_ld(v + i), dt);
                if (lo) xi = ev_clamp(xi, lo[i % D], hi[i % D]);
                xo = xi;
                x[i] = xi;
            }
            if (x_in) ev_st(x_in + i, xo);
        }
        if (temb && i < E) ev_st(temb + i, ev_time_embed_elem(t_next, i, E));
    }
}

#define EV_ODE_STEP_V2(SUFFIX, VT)                                                                     \
    extern "C" __global__ void ode_step_v2_##SUFFIX(float* x, const VT* v, float* v_prev, VT* x_in,    \
                                                    VT* temb, const float* lo, const float* hi, int n, \
                                                    int D, int E, float dt, float t_next, int mode) { \
        ode_step_v2_body<VT>(x, v, v_prev, x_in, temb, lo, hi, n, D, E, dt, t_next, mode);            \
    }
EV_ODE_STEP_V2(f32, float)
EV_ODE_STEP_V2(f16, __half)
EV_ODE_STEP_V2(bf16, __nv_bfloat16)

// v1: the unfused baseline (what an exported graph does between engine launches).
extern "C" __global__ void time_embed_v1_f32(float* out, float t, int E) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < E) out[j] = ev_time_embed_elem(t, j, E);
}
extern "C" __global__ void axpy_v1_f32(float* x, const float* v, float dt, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = ev_euler(x[i], v[i], dt);
}
extern "C" __global__ void clamp_v1_f32(float* x, const float* lo, const float* hi, int n, int D) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = ev_clamp(x[i], lo[i % D], hi[i % D]);
}

// Time embeddings of a whole fixed schedule, out[k, :] = temb(ts[k]); grid = nt blocks.
extern "C" __global__ void time_embed_schedule_f32(float* out, const float* ts, int nt, int E) {
    for (int k = blockIdx.x; k < nt; k += gridDim.x)
        for (int j = threadIdx.x; j < E; j += blockDim.x) out[k * E + j] = ev_time_embed_elem(ts[k], j, E);
}
#endif  // device code

// ----------------------------------------------------------------------------------------------
// Standalone validation + benchmark (llm.c style): nvcc -DEV_STANDALONE ...

#if defined(EV_STANDALONE) && defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                               \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static float frand() { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }

// NaN never passes: a NaN in either array fails (|nan - y| <= tol is false).
static bool validate(const char* what, const float* gpu, const float* cpu, int n, float tol) {
    int bad = 0;
    for (int i = 0; i < n; ++i) {
        const float err = fabsf(gpu[i] - cpu[i]);
        if (!(err <= tol * (1.0f + fabsf(cpu[i])))) {
            if (bad < 5) printf("  %s mismatch at %d: gpu %f cpu %f\n", what, i, gpu[i], cpu[i]);
            ++bad;
        }
    }
    printf("%-28s %s (%d/%d bad, tol %.1e)\n", what, bad ? "FAIL" : "OK", bad, n, tol);
    return bad == 0;
}

static int run_case(const char* name, int H, int D, int E, int steps) {
    const int n = H * D;
    std::vector<float> x0(n), v(n), lo(D), hi(D);
    for (int i = 0; i < n; ++i) { x0[i] = frand(); v[i] = 2.0f * frand(); }
    for (int d = 0; d < D; ++d) { lo[d] = -1.5f; hi[d] = 1.5f; }
    float *dx, *dv, *dvp, *dxin, *dtemb, *dlo, *dhi;
    CK(cudaMalloc(&dx, n * 4)); CK(cudaMalloc(&dv, n * 4)); CK(cudaMalloc(&dvp, n * 4));
    CK(cudaMalloc(&dxin, n * 4)); CK(cudaMalloc(&dtemb, E * 4));
    CK(cudaMalloc(&dlo, D * 4)); CK(cudaMalloc(&dhi, D * 4));
    CK(cudaMemcpy(dv, v.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dlo, lo.data(), D * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dhi, hi.data(), D * 4, cudaMemcpyHostToDevice));
    const float dt = 1.0f / steps;
    const int threads = ((std::max(n, E) + 31) / 32) * 32;
    printf("== %s: H=%d D=%d E=%d N=%d\n", name, H, D, E, steps);

    // Validate: N Heun steps with clamping against the CPU reference (constant velocity).
    std::vector<float> cx = x0, cvp(n), cxin(n), ctemb(E), gx(n), gxin(n), gtemb(E);
    CK(cudaMemcpy(dx, x0.data(), n * 4, cudaMemcpyHostToDevice));
    for (int k = 0; k < steps; ++k) {
        const float t = k * dt;
        ode_step_v2_f32<<<1, threads>>>(dx, dv, dvp, dxin, dtemb, dlo, dhi, n, D, E, dt, t + dt,
                                        EV_MODE_HEUN_PREDICT);
        ode_step_v2_f32<<<1, threads>>>(dx, dv, dvp, dxin, dtemb, dlo, dhi, n, D, E, dt, t + dt,
                                        EV_MODE_HEUN_CORRECT);
        ode_step_cpu(cx.data(), v.data(), cvp.data(), cxin.data(), ctemb.data(), lo.data(), hi.data(), n,
                     D, E, dt, t + dt, EV_MODE_HEUN_PREDICT);
        ode_step_cpu(cx.data(), v.data(), cvp.data(), cxin.data(), ctemb.data(), lo.data(), hi.data(), n,
                     D, E, dt, t + dt, EV_MODE_HEUN_CORRECT);
    }
    CK(cudaGetLastError());
    CK(cudaMemcpy(gx.data(), dx, n * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gxin.data(), dxin, n * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gtemb.data(), dtemb, E * 4, cudaMemcpyDeviceToHost));
    bool ok = validate("x (heun, clamped)", gx.data(), cx.data(), n, 1e-5f);
    ok &= validate("x_in", gxin.data(), cxin.data(), n, 1e-5f);
    ok &= validate("temb(t=1)", gtemb.data(), ctemb.data(), E, 1e-4f);

    // Benchmark: one Euler step with clamping + next temb; v1 = 3 launches, v2 = 1 launch.
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    const int reps = 200, inner = 100;
    for (int version = 1; version <= 2; ++version) {
        std::vector<float> ms;
        for (int r = 0; r < reps + 10; ++r) {
            CK(cudaEventRecord(a));
            for (int k = 0; k < inner; ++k) {
                if (version == 1) {
                    axpy_v1_f32<<<(n + 255) / 256, 256>>>(dx, dv, dt, n);
                    clamp_v1_f32<<<(n + 255) / 256, 256>>>(dx, dlo, dhi, n, D);
                    time_embed_v1_f32<<<(E + 255) / 256, 256>>>(dtemb, 0.5f, E);
                } else {
                    ode_step_v2_f32<<<1, threads>>>(dx, dv, nullptr, dxin, dtemb, dlo, dhi, n, D, E, dt,
                                                    0.5f, EV_MODE_EULER);
                }
            }
            CK(cudaEventRecord(b));
            CK(cudaEventSynchronize(b));
            float t_ms;
            CK(cudaEventElapsedTime(&t_ms, a, b));
            if (r >= 10) ms.push_back(t_ms / inner);  // first 10 are warm-up
        }
        std::sort(ms.begin(), ms.end());
        const double med_us = ms[ms.size() / 2] * 1e3;
        // Bytes one step must move: read x, v, bounds; write x, x_in, temb.
        const double bytes = 4.0 * (3 * n + n + 2 * D + E);
        printf("ode_step v%d: median %.2f us/step, %.3f GB/s achieved (%.0f bytes/step)\n", version,
               med_us, bytes / (med_us * 1e3), bytes);
    }
    CK(cudaFree(dx)); CK(cudaFree(dv)); CK(cudaFree(dvp)); CK(cudaFree(dxin)); CK(cudaFree(dtemb));
    CK(cudaFree(dlo)); CK(cudaFree(dhi));
    return ok ? 0 : 1;
}

int main() {
    int dev;
    cudaDeviceProp prop;
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    int fails = 0;
    fails += run_case("tiny", 8, 2, 128, 10);
    fails += run_case("base", 16, 2, 512, 10);
    return fails;
}
#endif
