/* Device helpers of the selection kernels: conversion to float, 16-byte loads, the (score, index) order
 * of torch.argmax / torch.topk, the warp's best (score, index) and the merge of two log-sum-exps.
 * Header-only, no torch headers. */
#ifndef ENCDEC_DEVICE_UTILS_H
#define ENCDEC_DEVICE_UTILS_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "encdec_abi.h"

namespace encdec {

constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/* 16 bytes through the read-only path; p must be 16-byte aligned */
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

/* The order of torch.argmax / torch.topk: a NaN beats any number, then the larger score, then, among
 * equal scores, the lower index. */
__device__ __forceinline__ bool better(float a, int64_t ia, float b, int64_t ib) {
    const bool na = a != a, nb = b != b;
    if (na != nb) return na;
    if (!na && a != b) return a > b;
    return ia < ib;
}

/* (score, index) of the best entry across the warp, in every lane */
__device__ __forceinline__ void warp_best(float& v, int64_t& i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, v, off);
        const int64_t oi = __shfl_xor_sync(FULL_MASK, i, off);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

/* Running (max, sum of exp(x - max)) of a log-sum-exp, merged from two partial ones. */
__device__ __forceinline__ void lse_merge(float& m, float& s, float om, float os) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) return;  // both empty (or all -inf): nothing to add
    s = (m == -INFINITY ? 0.f : s * expf(m - nm)) + (om == -INFINITY ? 0.f : os * expf(om - nm));
    m = nm;
}

}  // namespace encdec

#endif
