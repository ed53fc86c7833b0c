/* Matrix-vector products for the decode step: y = epilogue(x @ w.T) for 1-16 rows of x.
 *
 * At decode time a projection reads its whole weight matrix for a handful of rows, so it is bound by
 * how fast w streams from memory; cuBLAS runs these GEMV-shaped products as small GEMMs. Here every
 * thread streams w in 16-byte loads, a few loads in flight, and the epilogue (bias; bias + GELU;
 * bias + residual) is applied before the one store of y.
 *
 * fp16 / bf16 (gemv_mma_kernel): tensor cores with the rows of x as the m side. A warp owns a tile of
 * 8 outputs (mma.m16n8k16: m = 16 rows of x, n = 8 rows of w, k = 16). The reduction runs over k in
 * chunks of 32: thread (g = lane / 4, t = lane % 4) loads 8 consecutive elements of w row n0 + g and
 * of x rows g and g + 8 at k = chunk * 32 + 8 t, and feeds them to two MMAs. The fragment layout puts
 * thread t's four k slots of an MMA at {2t, 2t+1, 2t+8, 2t+9} in both A (x) and B (w); assigning them
 * memory elements {0,1,2,3} (first MMA) and {4,5,6,7} (second) of the thread's 8 is a permutation of
 * k that is the same for x and w, so the sum is unchanged while every load stays 16 bytes wide.
 * Rows of x past `rows` are zeros (never loaded). fp32 accumulation.
 *
 * fp32 (gemv_fma_kernel): a warp per output, lanes stride over k in float4 loads, one accumulator per
 * row; FMAs on CUDA cores, so fp32 results match an fp32 reference to rounding.
 *
 * Split-K: `split` warps of a block share a tile, each taking every split-th chunk of k, and their
 * partial sums meet in shared memory (in a fixed order: deterministic). The caller picks `split` so
 * that narrow outputs (768 wide) still put thousands of warps in flight.
 *
 * Epilogues round as the torch ops they replace round (see encdec_abi.h): linear_gelu is
 * bias_gelu(linear(x, w, None), b), so the product is rounded to the dtype, the bias added and
 * rounded again, then GELU in fp32.
 *
 * Reference: encdec_fast.ops.linear / linear_gelu / linear_residual.
 */
#include "device_utils.h"

namespace encdec {
namespace {

constexpr int WARPS = 8;   // per block
constexpr int TILE_N = 8;  // outputs per warp tile of the MMA kernel (mma n)
constexpr int CHUNK = 32;  // k per MMA step: 4 threads x 8 elements
constexpr int UNROLL = 4;  // chunks whose loads are in flight together
constexpr int MAX_ROWS = 16;

struct GemvArgs {
    const void* x;
    int64_t ldx;
    const void* w;
    const void* bias;
    const void* residual;
    int64_t ldr;
    void* y;
    int64_t ldy;
    int rows, n_out, k, epilogue, split;
};

template <typename T>
__device__ __forceinline__ float apply_epilogue(const GemvArgs& a, float acc, int r, int n) {
    const T* bias = static_cast<const T*>(a.bias);
    const float b = bias ? to_float(bias[n]) : 0.f;
    switch (a.epilogue) {
        case ENCDEC_EPI_BIAS:
            return acc + b;
        case ENCDEC_EPI_BIAS_GELU_ERF: {
            const float s = round_to<T>(round_to<T>(acc) + b);
            return 0.5f * s * (1.f + erff(s * 0.70710678118654752f));
        }
        case ENCDEC_EPI_BIAS_GELU_TANH: {
            const float s = round_to<T>(round_to<T>(acc) + b);
            return 0.5f * s * (1.f + tanhf(0.79788456080286536f * (s + 0.044715f * s * s * s)));
        }
        case ENCDEC_EPI_BIAS_RESIDUAL: {
            const T* res = static_cast<const T*>(a.residual);
            return round_to<T>(acc + b) + to_float(res[static_cast<int64_t>(r) * a.ldr + n]);
        }
        default:
            return acc;
    }
}

template <typename T>
__device__ __forceinline__ void store(const GemvArgs& a, float acc, int r, int n) {
    T* y = static_cast<T*>(a.y);
    y[static_cast<int64_t>(r) * a.ldy + n] = from_float<T>(apply_epilogue<T>(a, acc, r, n));
}

/* c += A (16 x 16, rows of x) @ B (16 x 8, k x outputs); fp32 accumulators */
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <typename T>
__global__ void __launch_bounds__(WARPS * 32) gemv_mma_kernel(GemvArgs a) {
    __shared__ float4 partial[WARPS][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = a.split;
    const int tile = blockIdx.x * (WARPS / split) + warp / split;
    const int s = warp % split;                // this warp's share of k
    const int g = lane >> 2, t = lane & 3;     // MMA group (row of x / output) and thread in group
    const int n0 = tile * TILE_N;
    const bool live = n0 < a.n_out;            // a dead warp still meets its tile at the barrier
    const bool has0 = g < a.rows, has1 = g + 8 < a.rows;
    const T* w = static_cast<const T*>(a.w) + static_cast<int64_t>(min(n0 + g, a.n_out - 1)) * a.k;  // [k]
    const T* x0 = static_cast<const T*>(a.x) + static_cast<int64_t>(has0 ? g : 0) * a.ldx;          // [k]
    const T* x1 = static_cast<const T*>(a.x) + static_cast<int64_t>(has1 ? g + 8 : 0) * a.ldx;      // [k]
    const int nchunks = (a.k + CHUNK - 1) / CHUNK;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float c[4] = {0.f, 0.f, 0.f, 0.f};
    if (live) {
        for (int c0 = s; c0 < nchunks; c0 += UNROLL * split) {
            uint4 wv[UNROLL], xa[UNROLL], xb[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int kk = (c0 + u * split) * CHUNK + t * 8;  // k % 8 == 0: all 8 in range or none
                const bool ok = kk < a.k;
                wv[u] = ok ? load16(w + kk) : zero;
                xa[u] = ok && has0 ? load16(x0 + kk) : zero;
                xb[u] = ok && has1 ? load16(x1 + kk) : zero;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                mma_16816<T>(c, xa[u].x, xb[u].x, xa[u].y, xb[u].y, wv[u].x, wv[u].y);
                mma_16816<T>(c, xa[u].z, xb[u].z, xa[u].w, xb[u].w, wv[u].z, wv[u].w);
            }
        }
    }
    if (split > 1) {  // uniform across the block
        partial[warp][lane] = make_float4(c[0], c[1], c[2], c[3]);
        __syncthreads();
        if (s != 0) return;
        for (int j = 1; j < split; ++j) {
            const float4 o = partial[warp + j][lane];
            c[0] += o.x, c[1] += o.y, c[2] += o.z, c[3] += o.w;
        }
    }
    if (!live) return;
    // c[0], c[1]: row g, outputs n0 + 2t, n0 + 2t + 1; c[2], c[3]: row g + 8, the same outputs
    const int n = n0 + 2 * t;
    if (has0) {
        if (n < a.n_out) store<T>(a, c[0], g, n);
        if (n + 1 < a.n_out) store<T>(a, c[1], g, n + 1);
    }
    if (has1) {
        if (n < a.n_out) store<T>(a, c[2], g + 8, n);
        if (n + 1 < a.n_out) store<T>(a, c[3], g + 8, n + 1);
    }
}

__global__ void __launch_bounds__(WARPS * 32) gemv_fma_kernel(GemvArgs a) {
    __shared__ float partial[WARPS][MAX_ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = a.split;
    const int n = blockIdx.x * (WARPS / split) + warp / split;  // this warp's output
    const int s = warp % split;
    const bool live = n < a.n_out;
    const float* w = static_cast<const float*>(a.w) + static_cast<int64_t>(live ? n : 0) * a.k;  // [k]
    const float* x = static_cast<const float*>(a.x);                                            // [rows, ldx]
    const int nvec = a.k / 4;

    float acc[MAX_ROWS];
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) acc[r] = 0.f;
    if (live) {
        for (int j = s * 32 + lane; j < nvec; j += 32 * split) {
            const uint4 wu = load16(w + 4 * j);
            const float4 wv = *reinterpret_cast<const float4*>(&wu);
#pragma unroll
            for (int r = 0; r < MAX_ROWS; ++r) {
                if (r < a.rows) {
                    const uint4 xu = load16(x + static_cast<int64_t>(r) * a.ldx + 4 * j);
                    const float4 xv = *reinterpret_cast<const float4*>(&xu);
                    acc[r] = fmaf(xv.x, wv.x, fmaf(xv.y, wv.y, fmaf(xv.z, wv.z, fmaf(xv.w, wv.w, acc[r]))));
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) acc[r] = warp_sum(acc[r]);
    // lane r keeps row r's sum
    float mine = 0.f;
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r)
        if (lane == r) mine = acc[r];
    if (split > 1) {  // uniform across the block
        if (lane < MAX_ROWS) partial[warp][lane] = mine;
        __syncthreads();
        if (s != 0) return;
        for (int j = 1; j < split; ++j)
            if (lane < MAX_ROWS) mine += partial[warp + j][lane];
    }
    if (live && lane < a.rows) store<float>(a, mine, lane, n);
}

}  // namespace
}  // namespace encdec

ENCDEC_EXPORT int encdec_gemv(const void* x, int64_t ldx, const void* w, const void* bias, const void* residual,
                              int64_t ldr, void* y, int64_t ldy, int rows, int n_out, int k, int dtype, int epilogue,
                              int split, void* stream) {
    using namespace encdec;
    const bool split_ok = split == 1 || split == 2 || split == 4 || split == 8;
    if (rows < 1 || rows > MAX_ROWS || n_out < 1 || k < 8 || k % 8 != 0 || !split_ok || epilogue < ENCDEC_EPI_NONE ||
        epilogue > ENCDEC_EPI_BIAS_RESIDUAL || (epilogue == ENCDEC_EPI_BIAS_RESIDUAL && residual == nullptr))
        return static_cast<int>(cudaErrorInvalidValue);
    const GemvArgs a{x, ldx, w, bias, residual, ldr, y, ldy, rows, n_out, k, epilogue, split};
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int tiles_per_block = WARPS / split;
    switch (dtype) {
        case ENCDEC_F32: {
            const int grid = (n_out + tiles_per_block - 1) / tiles_per_block;
            gemv_fma_kernel<<<grid, WARPS * 32, 0, st>>>(a);
            break;
        }
        case ENCDEC_F16:
        case ENCDEC_BF16: {
            const int tiles = (n_out + TILE_N - 1) / TILE_N;
            const int grid = (tiles + tiles_per_block - 1) / tiles_per_block;
            if (dtype == ENCDEC_F16)
                gemv_mma_kernel<__half><<<grid, WARPS * 32, 0, st>>>(a);
            else
                gemv_mma_kernel<__nv_bfloat16><<<grid, WARPS * 32, 0, st>>>(a);
            break;
        }
        default:
            return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(cudaGetLastError());
}
