// Device-side load/store between fp32 registers and the storage types the engines use.
// Math always runs in fp32; only storage is fp16/bf16 (the integrator state itself stays fp32).
#pragma once
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float ev_ld(const float* p) { return *p; }
__device__ __forceinline__ float ev_ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ev_ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void ev_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void ev_st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void ev_st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Four consecutive elements in one vector load (caller guarantees 4-element alignment).
__device__ __forceinline__ void ev_ld4(const float* p, float o[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void ev_ld4(const __half* p, float o[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __half2 a = *reinterpret_cast<const __half2*>(&raw.x);
    const __half2 b = *reinterpret_cast<const __half2*>(&raw.y);
    const float2 fa = __half22float2(a), fb = __half22float2(b);
    o[0] = fa.x; o[1] = fa.y; o[2] = fb.x; o[3] = fb.y;
}
__device__ __forceinline__ void ev_ld4(const __nv_bfloat16* p, float o[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
    const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
    o[0] = fa.x; o[1] = fa.y; o[2] = fb.x; o[3] = fb.y;
}

__device__ __forceinline__ float ev_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
#endif
