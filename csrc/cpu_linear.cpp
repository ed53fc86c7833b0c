// CPU projections with fp32 activations and low-precision weights, fp32 accumulation and fp32 outputs:
//
//   y[m, n] = act(sum_k LN?(x)[m, k] * w[n, k]  (+ bias[n])) (+ residual[m, n])
//
// with the LayerNorm of the input rows (fp32) and the GELU (tanh or erf form) fused, as a decode step's projections
// need them (ops.fused_linear):
//
//   int8 weights  w[n, k] = scale[n, k / G] * q[n, k], q int8, one fp16 scale per output and group of G = 32
//                 inputs (llama.cpp's Q8_0 layout of the scales: 8.5 bits a weight). Each row of x is quantised to
//                 int16 with its own scale (xq = round(x / sx[m]), |xq| <= qmax = 32767, an error ~3e-5 of the
//                 row's largest value, far below the weights'), then AVX512-VNNI vpdpwssd (int16 pairs, int32
//                 sums over one group: no overflow; AVX512BW vpmaddwd + vpaddd without VNNI), each group's sum
//                 scaled into an fp32 accumulator, y = acc * sx[m].
//   bf16 weights  x rounded to bf16 (round to nearest even), AVX512-BF16 vdpbf16ps (bf16 pairs, fp32 sums).
//
// Why not torch's kernels: oneDNN's bf16 linear returns bf16 (the products rounded to 8 bits before the
// residual add: measured to flip 1-2% of near-tied next tokens on real weights), and torch's int8 products
// either quantise the activations to int8 (fbgemm, oneDNN qlinear: 5-10x the KL divergence of int8 weights
// alone) or are slow beyond one row (aten._weight_int8pack_mm).
//
// Weight layout ("pair-packed", written by encdec_fast/cpu/kernels.py's pack_rows): [N / 16][K / 2][16][2], N padded
// to a multiple of 32 and K to a multiple of 2 with zeros: one 16-output block of a k pair is 32 consecutive values
// (32 bytes int8, 64 bytes bf16), which a vpdpwssd / vdpbf16ps multiplies with the pair (x[m, 2p], x[m, 2p + 1])
// broadcast to all lanes. Every lane of an accumulator is one output: no horizontal sums. int8 scales (pack_scales):
// [N / 16][groups][16] fp16, groups = ceil(K / G), zeros past N: one block's scales in the order its loop reads them.
//
// Blocking: threads (OpenMP: torch's own runtime, libgomp.so.1, already loaded by torch, so torch's thread
// count applies) split the output blocks of 32; each thread runs its blocks over rows 8 at a time, so a block's
// weights (32 x K values, <= 200 KB) are read from memory once per call and from cache for the next 8 rows.
//
// Decode attention (encdec_cpu_decode_attention): one query per row over a window of key rows, fp32 or bf16
// keys and values, fp32 scores, softmax and output; threads split the (row, head) pairs. It replaces one SDPA call
// per request and layer (the cross-attention windows of a batch are not evenly spaced): at batch 8 those calls
// were most of a decode step's time outside the projections.
//
// C ABI (encdec_fast/cpu/kernels.py binds it with ctypes): raw pointers, int64 strides in elements; every
// function returns 0, or a negative code (see encdec_cpu_error_string).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define ENCDEC_CPU_ABI_VERSION 12
#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int LANES = 16;        // outputs per accumulator
constexpr int NB = 2;            // accumulators per row: a thread's block is NB * 16 = 32 outputs
constexpr int BLOCK = NB * LANES;
constexpr int MB = 8;            // rows per pass over a block's weights

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// e^x, 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7),
// times 2^n by vscalefps; x below -87.3 gives 0 (a masked-out score), above 88.7 inf
inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7228f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// GELU, tanh form (GPT-2's gelu_new): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), tanh z = 1 - 2 / (1 + e^2z)
inline __m512 gelu_tanh512(__m512 x) {
    const __m512 c = _mm512_set1_ps(0.7978845608028654f), a = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f),
                 two = _mm512_set1_ps(2.0f), half = _mm512_set1_ps(0.5f);
    __m512 z = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, x), _mm512_mul_ps(x, x), x));
    __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(one, exp512(_mm512_add_ps(z, z)))));
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
}

// GELU, erf form (BERT's): 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
inline __m512 gelu_erf512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f));
    __m512 au = _mm512_abs_ps(u);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), au, one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = _mm512_sub_ps(one, _mm512_mul_ps(p, exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(au, au)))));
    e = _mm512_mask_sub_ps(e, _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), e);  // erf(-u) = -erf(u)
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, e));
}

enum Act { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_GELU_ERF = 2 };

struct Epilogue {
    int act;                // Act: applied after the bias, before the residual
    const float* bias;      // [N] or null
    const float* residual;  // [M, N] (row stride rs) or null
    int64_t rs;
    float* y;               // [M, N] (row stride ys)
    int64_t ys;
    int64_t N;
};

// y[m, n0 .. n0 + 16) = act(acc * scale (+ bias)) (+ residual), masked at the end of N
inline void store(const Epilogue& e, int64_t m, int64_t n0, __m512 v) {
    int64_t left = e.N - n0;
    if (left <= 0) return;
    __mmask16 k = left >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    if (e.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, e.bias + n0));
    if (e.act == ACT_GELU_TANH) v = gelu_tanh512(v);
    else if (e.act == ACT_GELU_ERF) v = gelu_erf512(v);
    if (e.residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, e.residual + m * e.rs + n0));
    _mm512_mask_storeu_ps(e.y + m * e.ys + n0, k, v);
}

// y rows m0 .. m0 + R, outputs n0 .. n0 + 32 from a block's fp32 sums (the fp32 and bf16 products' epilogue)
template <int R>
inline void store_block(const Epilogue& e, int64_t m0, int64_t n0, __m512 (&acc)[R][NB]) {
    for (int j = 0; j < NB; ++j) {
        int64_t n = n0 + j * LANES;
        if (n >= e.N) break;
        for (int r = 0; r < R; ++r) store(e, m0 + r, n, acc[r][j]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// int8 weights x int16 activations
// ---------------------------------------------------------------------------------------------------------
// (inline assembly for VNNI: GCC 12's _mm512_dpwssd_epi32 does not keep a loop's accumulator in place but copies
// every one of them each iteration, 2 moves per multiply, and spills them at 8 rows)
inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// rows m0 .. m0 + R of one 32-output block; xq: int16 rows of Kp values (Kp / 2 int32 pairs), row stride Kp; sb:
// the block's scales ([2][groups][16] fp16), gp pairs a group. Each group's int32 sums (exact) stay in registers
// (2R accumulators); at the group's end they are converted and scaled into fp32 sums kept in memory (touched once a
// group: in registers too they would leave none for the loop, and the compiler would spill inside it).
template <int R>
void block_i8(const int8_t* wb, int64_t pairs, int64_t gp, const uint16_t* sb, int64_t groups, const int16_t* xq,
              int64_t Kp, int64_t m0, const float* sx, int64_t n0, const Epilogue& e) {
    alignas(64) float sum[R][NB][LANES];
    memset(sum, 0, sizeof(sum));
    const int32_t* xp[R];
    for (int r = 0; r < R; ++r) xp[r] = (const int32_t*)(xq + (m0 + r) * Kp);
    const int8_t* w0 = wb;                    // block n0 / 16:      [pairs][16][2]
    const int8_t* w1 = wb + pairs * 32;       // block n0 / 16 + 1
    const uint16_t* s0 = sb;                  // their scales:       [groups][16]
    const uint16_t* s1 = sb + groups * LANES;
    for (int64_t g = 0, p0 = 0; p0 < pairs; ++g, p0 += gp) {
        const int64_t p1 = p0 + gp < pairs ? p0 + gp : pairs;
        __m512i acc[R][NB];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
        for (int64_t p = p0; p < p1; ++p) {
            __m512i a0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w0 + p * 32)));
            __m512i a1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w1 + p * 32)));
            for (int r = 0; r < R; ++r) {
                __m512i b = _mm512_set1_epi32(xp[r][p]);
                acc[r][0] = dot_pairs(acc[r][0], a0, b);
                acc[r][1] = dot_pairs(acc[r][1], a1, b);
            }
        }
        const __m512 c0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s0 + g * LANES)));
        const __m512 c1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s1 + g * LANES)));
        for (int r = 0; r < R; ++r) {
            _mm512_store_ps(sum[r][0], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), c0, _mm512_load_ps(sum[r][0])));
            _mm512_store_ps(sum[r][1], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1]), c1, _mm512_load_ps(sum[r][1])));
        }
    }
    for (int j = 0; j < NB; ++j) {
        int64_t n = n0 + j * LANES;
        if (n >= e.N) break;
        for (int r = 0; r < R; ++r) store(e, m0 + r, n, _mm512_mul_ps(_mm512_load_ps(sum[r][j]), _mm512_set1_ps(sx[m0 + r])));
    }
}

typedef void (*block_i8_fn)(const int8_t*, int64_t, int64_t, const uint16_t*, int64_t, const int16_t*, int64_t, int64_t,
                            const float*, int64_t, const Epilogue&);
const block_i8_fn BLOCK_I8[MB + 1] = {nullptr, block_i8<1>, block_i8<2>, block_i8<3>, block_i8<4>,
                                      block_i8<5>, block_i8<6>, block_i8<7>, block_i8<8>};

// ---------------------------------------------------------------------------------------------------------
// bf16 weights x bf16 activations
// ---------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------
// fp32 weights x fp32 activations (layout [N / 16][K][16]: one 16-output block of one k is 16 consecutive floats)
// ---------------------------------------------------------------------------------------------------------
template <int R>
void block_f32(const float* wb, int64_t K, const float* x, int64_t xs, int64_t m0, int64_t n0, const Epilogue& e) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    const float* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + (m0 + r) * xs;
    const float* w0 = wb;
    const float* w1 = wb + K * LANES;
    for (int64_t k = 0; k < K; ++k) {
        __m512 a0 = _mm512_loadu_ps(w0 + k * LANES), a1 = _mm512_loadu_ps(w1 + k * LANES);
        for (int r = 0; r < R; ++r) {
            __m512 b = _mm512_set1_ps(xr[r][k]);
            acc[r][0] = _mm512_fmadd_ps(a0, b, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a1, b, acc[r][1]);
        }
    }
    store_block<R>(e, m0, n0, acc);
}

typedef void (*block_f32_fn)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, const Epilogue&);
const block_f32_fn BLOCK_F32[MB + 1] = {nullptr, block_f32<1>, block_f32<2>, block_f32<3>, block_f32<4>,
                                        block_f32<5>, block_f32<6>, block_f32<7>, block_f32<8>};

#if defined(__AVX512BF16__)
template <int R>
void block_bf16(const uint16_t* wb, int64_t pairs, const uint16_t* xb, int64_t Kp, int64_t m0, int64_t n0,
                const Epilogue& e) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    const int32_t* xp[R];
    for (int r = 0; r < R; ++r) xp[r] = (const int32_t*)(xb + (m0 + r) * Kp);
    const uint16_t* w0 = wb;
    const uint16_t* w1 = wb + pairs * 32;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh a0 = (__m512bh)_mm512_loadu_si512((const void*)(w0 + p * 32));
        __m512bh a1 = (__m512bh)_mm512_loadu_si512((const void*)(w1 + p * 32));
        for (int r = 0; r < R; ++r) {
            __m512bh b = (__m512bh)_mm512_set1_epi32(xp[r][p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a0, b);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a1, b);
        }
    }
    store_block<R>(e, m0, n0, acc);
}

typedef void (*block_bf16_fn)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, const Epilogue&);
const block_bf16_fn BLOCK_BF16[MB + 1] = {nullptr, block_bf16<1>, block_bf16<2>, block_bf16<3>, block_bf16<4>,
                                          block_bf16<5>, block_bf16<6>, block_bf16<7>, block_bf16<8>};
#endif

inline uint16_t to_bf16(float f) {  // round to nearest even (NaN stays NaN)
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Row m of the product's input: x's row, or LayerNorm(x's row) with gamma, beta, eps (fp32, two passes: mean, then
// the mean of squared deviations, as torch's layer_norm) written to tmp [K]. Returns the row to read.
const float* input_row(const float* xr, int64_t K, const float* ln_w, const float* ln_b, float eps, float* tmp) {
    if (!ln_w) return xr;
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES) acc = _mm512_add_ps(acc, _mm512_loadu_ps(xr + k));
    float sum = _mm512_reduce_add_ps(acc);
    for (; k < K; ++k) sum += xr[k];
    const float mean = sum / (float)K;
    const __m512 mv = _mm512_set1_ps(mean);
    acc = _mm512_setzero_ps();
    for (k = 0; k + LANES <= K; k += LANES) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xr + k), mv);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    float var = _mm512_reduce_add_ps(acc);
    for (; k < K; ++k) var += (xr[k] - mean) * (xr[k] - mean);
    const float rstd = 1.0f / sqrtf(var / (float)K + eps);
    const __m512 rv = _mm512_set1_ps(rstd);
    for (k = 0; k + LANES <= K; k += LANES) {
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + k), mv), rv);
        __m512 g = ln_w ? _mm512_loadu_ps(ln_w + k) : _mm512_set1_ps(1.0f);
        __m512 b = ln_b ? _mm512_loadu_ps(ln_b + k) : _mm512_setzero_ps();
        _mm512_storeu_ps(tmp + k, _mm512_fmadd_ps(d, g, b));
    }
    for (; k < K; ++k) tmp[k] = (xr[k] - mean) * rstd * ln_w[k] + (ln_b ? ln_b[k] : 0.0f);
    return tmp;
}


}  // namespace

EXPORT int encdec_cpu_abi_version() { return ENCDEC_CPU_ABI_VERSION; }

// bit 0: int8 kernel built with VNNI; bit 1: bf16 kernel built (AVX512-BF16)
EXPORT int encdec_cpu_features() {
    int f = 0;
#if defined(__AVX512VNNI__)
    f |= 1;
#endif
#if defined(__AVX512BF16__)
    f |= 2;
#endif
    return f;
}

EXPORT const char* encdec_cpu_error_string(int code) {
    switch (code) {
        case 0: return "ok";
        case -1: return "bad sizes";
        case -2: return "out of memory";
        case -3: return "this library was built without AVX512-BF16";
        default: return "unknown error";
    }
}

EXPORT int64_t encdec_cpu_packed_rows(int64_t N) { return round_up(N, BLOCK); }

// Beam search's cache reorder: in each of `groups` blocks of `rows` rows (row_bytes apart, groups rows * row_bytes
// apart), row dst[i] takes the first `bytes` of row src[i], i < n, all reads before any write (a row may be both);
// threads split the groups (K and V of every layer), each with its own staging buffer.
EXPORT int encdec_cpu_move_rows(void* buf, int64_t groups, int64_t rows, int64_t row_bytes, int64_t bytes,
                                const int64_t* dst, const int64_t* src, int64_t n) {
    if (groups < 0 || rows < 0 || n < 0 || bytes < 0 || bytes > row_bytes) return -1;
    for (int64_t i = 0; i < n; ++i)
        if (dst[i] < 0 || dst[i] >= rows || src[i] < 0 || src[i] >= rows) return -1;
    if (n == 0 || bytes == 0) return 0;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        char* tmp = (char*)malloc((size_t)(n * bytes));
        if (!tmp) failed = 1;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            if (!tmp) continue;
            char* base = (char*)buf + g * rows * row_bytes;
            for (int64_t i = 0; i < n; ++i) memcpy(tmp + i * bytes, base + src[i] * row_bytes, (size_t)bytes);
            for (int64_t i = 0; i < n; ++i) memcpy(base + dst[i] * row_bytes, tmp + i * bytes, (size_t)bytes);
        }
        free(tmp);
    }
    return failed ? -2 : 0;
}

// One look at a decode step's logits x [rows, n] (row stride xs): idx[r] = the first index of row r's largest value,
// bad[r] = 1 when the row holds NaN or an infinity (its idx is then any index in range; the caller fails the row).
// Two passes over a row (its largest value, then where it first is), the second from cache.
EXPORT int encdec_cpu_row_argmax(const float* x, int64_t rows, int64_t n, int64_t xs, int64_t* idx, uint8_t* bad) {
    if (rows < 0 || n < 1) return -1;
#pragma omp parallel for schedule(static) if (rows * n > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * xs;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 odd = 0;  // lanes that met NaN or an infinity (x - x is NaN exactly then)
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) {
            const __m512 v = _mm512_loadu_ps(xr + i);
            odd |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_sub_ps(v, v), _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, v);
        }
        float best = _mm512_reduce_max_ps(mx);
        bool nonfinite = odd != 0;
        for (; i < n; ++i) {
            nonfinite |= !(xr[i] - xr[i] == 0.0f);
            best = xr[i] > best ? xr[i] : best;
        }
        int64_t at = 0;
        for (int64_t j = 0; j < n; j += LANES) {  // the first lane equal to the largest value
            const __mmask16 m = n - j >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            const __mmask16 eq = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, xr + j), _mm512_set1_ps(best),
                                                         _CMP_EQ_OQ);
            if (eq) {
                at = j + __builtin_ctz(eq);
                break;
            }
        }
        idx[r] = at;
        bad[r] = nonfinite ? 1 : 0;
    }
    return 0;
}

// The k largest values of each row of x [rows, n] (row stride xs), in descending order, into vals / idx [rows, k]
// (k <= 256, n >= k); among equal values the lower index comes first, and a value equal to a row's k-th is kept only if
// seen before it (so the values are each row's exact top k; which of tied indices is not torch.topk's promise either).
// One pass: 16 values at a time against the current k-th value, insertion for the few that beat it. Returns 0, or 1
// when a row holds NaN (the caller then uses torch.topk, which ranks NaN first).
EXPORT int encdec_cpu_row_topk(const float* x, int64_t rows, int64_t n, int64_t xs, int64_t k, float* vals,
                               int64_t* idx) {
    if (rows < 0 || k < 1 || k > 256 || n < k) return -1;
    int nan_seen = 0;
#pragma omp parallel for schedule(static) reduction(| : nan_seen) if (rows * n > 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * xs;
        float* v = vals + r * k;
        int64_t* ix = idx + r * k;
        int64_t filled = 0;
        auto insert = [&](float val, int64_t i) {  // into the sorted list, below every equal value
            int64_t p = filled < k ? filled++ : k - 1;
            while (p > 0 && v[p - 1] < val) {
                v[p] = v[p - 1], ix[p] = ix[p - 1];
                --p;
            }
            v[p] = val, ix[p] = i;
        };
        int64_t i = 0;
        for (; i < n && filled < k; ++i) {
            if (xr[i] != xr[i]) nan_seen = 1;
            insert(xr[i], i);
        }
        __mmask16 nans = 0;
        for (; i + LANES <= n; i += LANES) {
            const __m512 x16 = _mm512_loadu_ps(xr + i);
            nans |= _mm512_cmp_ps_mask(x16, x16, _CMP_UNORD_Q);
            __mmask16 hit = _mm512_cmp_ps_mask(x16, _mm512_set1_ps(v[k - 1]), _CMP_GT_OQ);
            while (hit) {
                const int lane = __builtin_ctz(hit);
                hit &= hit - 1;
                if (xr[i + lane] > v[k - 1]) insert(xr[i + lane], i + lane);
            }
        }
        for (; i < n; ++i) {
            if (xr[i] != xr[i]) nan_seen = 1;
            else if (xr[i] > v[k - 1]) insert(xr[i], i);
        }
        if (nans) nan_seen = 1;
    }
    return nan_seen;
}

// y [M, N] = act(LN?(x) @ dequant(w).T (+ bias)) (+ residual). x [M, K] fp32 (row stride xs); w pair-packed int8
// with scale [Np / 16][ceil(K / group)][16] fp16 (group even, at most 512: no int32 sum of a group overflows); bias [N] or null; residual [M, N] (row stride rs) or null; y (row stride
// ys) may be residual itself; ln_w, ln_b [K] or null: a LayerNorm of each row of x first (ln_b null: no shift).
EXPORT int encdec_cpu_linear_i8(const float* x, int64_t xs, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale,
                                int64_t group, int64_t N, const float* bias, const float* residual, int64_t rs, float* y, int64_t ys,
                                const float* ln_w, const float* ln_b, float ln_eps, int act) {
    if (M < 0 || K < 0 || N < 0 || group < 2 || group > 512 || group % 2) return -1;
    if (M == 0 || N == 0) return 0;
    int64_t pairs = (K + 1) / 2, Kp = pairs * 2, groups = (K + group - 1) / group;
    int16_t* xq = (int16_t*)aligned_alloc(64, (size_t)round_up(M * Kp * 2 + 64, 64));
    float* sx = (float*)aligned_alloc(64, (size_t)round_up(M * 4 + 64, 64));
    float* tmp = ln_w ? (float*)aligned_alloc(64, (size_t)round_up(M * K * 4 + 64, 64)) : nullptr;
    if (!xq || !sx || (ln_w && !tmp)) { free(xq); free(sx); free(tmp); return -2; }
    const float qmax = 32767.0f;
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) {  // per-row int16 quantisation
        const float* xr = input_row(x + m * xs, K, ln_w, ln_b, ln_eps, tmp + (ln_w ? m * K : 0));
        __m512 mx = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + LANES <= K; k += LANES) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
        float amax = _mm512_reduce_max_ps(mx);
        for (; k < K; ++k) amax = fmaxf(amax, fabsf(xr[k]));
        float s = amax > 0 ? amax / qmax : 1.0f;
        sx[m] = s;
        const __m512 inv = _mm512_set1_ps(1.0f / s), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
        int16_t* qr = xq + m * Kp;
        for (k = 0; k + LANES <= K; k += LANES) {  // round to nearest even (the default MXCSR mode)
            __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv), lo), hi);
            _mm256_storeu_si256((__m256i*)(qr + k), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
        }
        for (; k < K; ++k) qr[k] = (int16_t)lrintf(fminf(fmaxf(xr[k] / s, -qmax), qmax));
        if (Kp > K) qr[K] = 0;
    }
    Epilogue e{act, bias, residual, rs, y, ys, N};
    int64_t blocks = round_up(N, BLOCK) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* wb = w + b * NB * pairs * 32;
        const uint16_t* sb = scale + b * NB * groups * LANES;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int R = (int)(M - m0 < MB ? M - m0 : MB);
            BLOCK_I8[R](wb, pairs, group / 2, sb, groups, xq, Kp, m0, sx, b * BLOCK, e);
        }
    }
    free(xq);
    free(sx);
    free(tmp);
    return 0;
}

// y [M, N] = act(bf16(LN?(x)) @ w.T (+ bias)) (+ residual), fp32 sums and outputs; w pair-packed bf16; the other
// arguments as encdec_cpu_linear_i8's
EXPORT int encdec_cpu_linear_bf16(const float* x, int64_t xs, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                                  const float* bias, const float* residual, int64_t rs, float* y, int64_t ys,
                                  const float* ln_w, const float* ln_b, float ln_eps, int act) {
#if !defined(__AVX512BF16__)
    return -3;
#else
    if (M < 0 || K < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    int64_t pairs = (K + 1) / 2, Kp = pairs * 2;
    uint16_t* xb = (uint16_t*)aligned_alloc(64, (size_t)round_up(M * Kp * 2 + 64, 64));
    float* tmp = ln_w ? (float*)aligned_alloc(64, (size_t)round_up(M * K * 4 + 64, 64)) : nullptr;
    if (!xb || (ln_w && !tmp)) { free(xb); free(tmp); return -2; }
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = input_row(x + m * xs, K, ln_w, ln_b, ln_eps, tmp + (ln_w ? m * K : 0));
        uint16_t* br = xb + m * Kp;
        int64_t k = 0;
        for (; k + LANES <= K; k += LANES)
            _mm256_storeu_si256((__m256i*)(br + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + k)));
        for (; k < K; ++k) br[k] = to_bf16(xr[k]);
        if (Kp > K) br[K] = 0;
    }
    Epilogue e{act, bias, residual, rs, y, ys, N};
    int64_t blocks = round_up(N, BLOCK) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t* wb = w + b * NB * pairs * 32;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int R = (int)(M - m0 < MB ? M - m0 : MB);
            BLOCK_BF16[R](wb, pairs, xb, Kp, m0, b * BLOCK, e);
        }
    }
    free(xb);
    free(tmp);
    return 0;
#endif
}

// y [M, N] = act(LN?(x) @ w.T (+ bias)) (+ residual), fp32 throughout; w in the [N / 16][K][16] layout; the other
// arguments as encdec_cpu_linear_i8's. Each output is one fp32 sum over k in order (a row's result does not depend
// on the rows beside it).
EXPORT int encdec_cpu_linear_f32(const float* x, int64_t xs, int64_t M, int64_t K, const float* w, int64_t N,
                                 const float* bias, const float* residual, int64_t rs, float* y, int64_t ys,
                                 const float* ln_w, const float* ln_b, float ln_eps, int act) {
    if (M < 0 || K < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    float* tmp = nullptr;
    if (ln_w) {  // the LayerNorm-ed rows, contiguous
        tmp = (float*)aligned_alloc(64, (size_t)round_up(M * K * 4 + 64, 64));
        if (!tmp) return -2;
#pragma omp parallel for schedule(static) if (M * K > 65536)
        for (int64_t m = 0; m < M; ++m) {
            const float* r = input_row(x + m * xs, K, ln_w, ln_b, ln_eps, tmp + m * K);
            if (r != tmp + m * K) memcpy(tmp + m * K, r, (size_t)K * 4);
        }
        x = tmp;
        xs = K;
    }
    Epilogue e{act, bias, residual, rs, y, ys, N};
    int64_t blocks = round_up(N, BLOCK) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const float* wb = w + b * NB * K * LANES;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int R = (int)(M - m0 < MB ? M - m0 : MB);
            BLOCK_F32[R](wb, K, x, xs, m0, b * BLOCK, e);
        }
    }
    free(tmp);
    return 0;
}

// ---------------------------------------------------------------------------------------------------------
// decode attention
// ---------------------------------------------------------------------------------------------------------
namespace {

// 16 values of a key or value row from element d on, as fp32 (bf16: the upper half of an fp32)
inline __m512 load16(const void* base, int64_t off, bool bf16, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)base + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float*)base + off);
}

// one (row, head): CC > 0 compiles D = 16 * CC (every chunk full: registers); CC = 0 takes D at run time
template <int CC>
void attend_one(const float* qr, const void* k, const void* v, int64_t kt, int64_t kh, bool bf, int64_t s, int64_t len,
                int64_t h, int64_t D, float scale, float* scores, float* o) {
    constexpr int MAXC = 64;
    const int64_t chunks = CC > 0 ? CC : (D + LANES - 1) / LANES;
    auto mask = [&](int64_t c) -> __mmask16 {
        if (CC > 0) return (__mmask16)0xFFFF;
        int64_t left = D - c * LANES;
        return left >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    };
    __m512 qv[CC > 0 ? CC : MAXC];
    for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(c), qr + c * LANES), _mm512_set1_ps(scale));
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {  // scores
        const int64_t off = (s + j) * kt + h * kh;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load16(k, off + c * LANES, bf, mask(c)), acc);
        float sc = _mm512_reduce_add_ps(acc);
        scores[j] = sc;
        mx = sc > mx ? sc : mx;
    }
    __m512 sum = _mm512_setzero_ps(), mxv = _mm512_set1_ps(mx);  // probabilities (unnormalised)
    int64_t j = 0;
    for (; j + LANES <= len; j += LANES) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), mxv));
        _mm512_storeu_ps(scores + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (j < len) {
        __mmask16 m = (__mmask16)((1u << (len - j)) - 1);
        __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), mxv)));
        _mm512_mask_storeu_ps(scores + j, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    __m512 acc[CC > 0 ? CC : MAXC];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < len; ++j) {  // weighted values
        const int64_t off = (s + j) * kt + h * kh;
        const __m512 p = _mm512_set1_ps(scores[j]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, load16(v, off + c * LANES, bf, mask(c)), acc[c]);
    }
    for (int64_t c = 0; c < chunks; ++c) _mm512_mask_storeu_ps(o + c * LANES, mask(c), _mm512_mul_ps(acc[c], inv));
}

typedef void (*attend_fn)(const float*, const void*, const void*, int64_t, int64_t, bool, int64_t, int64_t, int64_t,
                          int64_t, float, float*, float*);

}  // namespace

// out[n, h, :] = softmax(scale * q[n, h] . k[t, h] for t in [starts[n], starts[n] + lens[n])) @ v[t, h]
// q [N, H, D] fp32 (strides qn, qh; unit stride on D); k, v [T, H, D] fp32 or bf16 (kv_bf16), strides kt, kh (the
// same for v); starts, lens int64 [N]; out [N, H, D] fp32 (strides on, oh). A row with lens <= 0 gets zeros.
// k_new, v_new [N, H, D] fp32 (strides nn, nh; unit stride on D) or null: first written at key row slots[n] of k, v
// of T (rounded to bf16, to nearest even, for bf16 keys), every write before any row attends.
EXPORT int encdec_cpu_decode_attention(const float* q, int64_t qn, int64_t qh, void* k, void* v, int64_t kt,
                                       int64_t kh, int kv_bf16, const int64_t* starts, const int64_t* lens, int64_t N,
                                       int64_t H, int64_t D, float scale, float* out, int64_t on, int64_t oh,
                                       const float* k_new, const float* v_new, int64_t nn, int64_t nh,
                                       const int64_t* slots, int64_t T) {
    if (N < 0 || H < 0 || D <= 0 || D > 1024 || (k_new && (!v_new || !slots))) return -1;
    for (int64_t n = 0; k_new && n < N; ++n)
        if (slots[n] < 0 || slots[n] >= T) return -1;
    static const attend_fn BY_CHUNKS[9] = {attend_one<0>, attend_one<1>, attend_one<2>, attend_one<3>, attend_one<4>,
                                           attend_one<5>, attend_one<6>, attend_one<7>, attend_one<8>};
    const attend_fn attend = (D % LANES == 0 && D / LANES <= 8) ? BY_CHUNKS[D / LANES] : attend_one<0>;
    const bool bf = kv_bf16 != 0;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        if (k_new) {
#pragma omp for schedule(static)
            for (int64_t p = 0; p < N * H; ++p) {  // the new keys and values (the loop's end is a barrier)
                const int64_t n = p / H, h = p % H, at = slots[n] * kt + h * kh;
                const float* kn = k_new + n * nn + h * nh;
                const float* vn = v_new + n * nn + h * nh;
                for (int64_t d = 0; d < D; ++d) {
                    if (bf) {
                        ((uint16_t*)k)[at + d] = to_bf16(kn[d]);
                        ((uint16_t*)v)[at + d] = to_bf16(vn[d]);
                    } else {
                        ((float*)k)[at + d] = kn[d];
                        ((float*)v)[at + d] = vn[d];
                    }
                }
            }
        }
        float* scores = nullptr;
        int64_t cap = 0;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < N * H; ++p) {
            const int64_t n = p / H, h = p % H, len = lens[n];
            float* o = out + n * on + h * oh;
            if (len <= 0) {
                for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
                continue;
            }
            if (len > cap) {
                free(scores);
                cap = round_up(len, 256);
                scores = (float*)aligned_alloc(64, (size_t)(cap * 4));
                if (!scores) {
                    failed = 1;
                    cap = 0;
                    continue;
                }
            }
            attend(q + n * qn + h * qh, k, v, kt, kh, bf, starts[n], len, h, D, scale, scores, o);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}

// ---------------------------------------------------------------------------------------------------------
// a whole decoder step in one call
// ---------------------------------------------------------------------------------------------------------
// The decoder's layers and its LM head over one token per row, as modules.Decoder.step runs them through the op
// table (the same products and the same attention, called in the same order: the same numbers, but for a post-LN
// layer's residual LayerNorm, computed here by input_row where the op table uses torch's), without a
// return to Python between them: at one row a bert-base + gpt2 step makes 97 kernel calls, and the Python around
// them (argument checks, views, allocations) cost about as much as the attention's arithmetic.
//
// Each layer is a fixed sequence over the residual stream X [N, E] (the structs say which LayerNorm goes where, so
// one sequence serves the pre-LN GPT-2 block and the post-LN BERT layer):
//   QKV = qkv(X)            self-attention over each row's cache window, its new K/V first written at slot
//   X   = o(A) + X           starts + lens - 1
//   Qc  = q(X)               cross-attention over each row's encoder keys
//   X   = cross_o(A) + X
//   Hd  = fc1(X)
//   X   = fc2(Hd) + X
// then logits = head(dense?(X)). A StepLinear's ln is its input's LayerNorm (fused into the product), its rln the
// LayerNorm of the residual it adds (a post-LN layer adds the normalised stream), applied to X in a scratch row.

struct StepLinear {
    const void* w;          // packed weight (kernels.py's layout); null: no such product (a head without dense)
    const uint16_t* scale;  // int8: fp16 group scales
    int64_t kind;           // 0 fp32, 1 bf16, 2 int8
    int64_t N, K, group;
    const float* bias;
    const float* ln_w;
    const float* ln_b;
    const float* rln_w;
    const float* rln_b;
    float ln_eps, rln_eps;
    int64_t act;
};

struct StepLayer {
    StepLinear qkv, o, q, cross_o, fc1, fc2;
    float self_scale, cross_scale;
};

namespace {

// y = lin(x) (+ res, or + LN(res) with the product's rln), x row stride xs, y and res row stride ys; rtmp: M * N
// floats for the residual's LayerNorm
int step_linear(const StepLinear& L, const float* x, int64_t xs, int64_t M, float* y, int64_t ys, const float* res,
                float* rtmp) {
    int64_t rs = ys;
    if (res && L.rln_w) {
        for (int64_t m = 0; m < M; ++m) input_row(res + m * ys, L.N, L.rln_w, L.rln_b, L.rln_eps, rtmp + m * L.N);
        res = rtmp;
        rs = L.N;
    }
    switch (L.kind) {
        case 2: return encdec_cpu_linear_i8(x, xs, M, L.K, (const int8_t*)L.w, L.scale, L.group, L.N, L.bias, res, rs,
                                            y, ys, L.ln_w, L.ln_b, L.ln_eps, (int)L.act);
        case 1: return encdec_cpu_linear_bf16(x, xs, M, L.K, (const uint16_t*)L.w, L.N, L.bias, res, rs, y, ys,
                                              L.ln_w, L.ln_b, L.ln_eps, (int)L.act);
        case 0: return encdec_cpu_linear_f32(x, xs, M, L.K, (const float*)L.w, L.N, L.bias, res, rs, y, ys, L.ln_w,
                                             L.ln_b, L.ln_eps, (int)L.act);
    }
    return -1;
}

}  // namespace

// logits [N, V] (row stride V) of one decode step. x [N, E] fp32: the rows' input embeddings (read, not written).
// layers [n_layers]; dense (head.w null: none) and head: the LM head. caches: per layer 4 pointers (self K, self V,
// cross K, cross V), each [T, H, D] key rows of T_self / T_cross rows, strides (self_kt, D) / (H * D, D), bf16 when
// self_bf16 / cross_bf16 else fp32. self_starts, self_lens, cross_starts, cross_lens int64 [N]: row n attends self keys
// [self_starts[n], + self_lens[n]) (its new K/V go to the last of them) and cross keys [cross_starts[n],
// + cross_lens[n]); windows are cut to the key rows there are (a row without keys gets zeros).
EXPORT int encdec_cpu_decoder_step(const StepLayer* layers, int64_t n_layers, const StepLinear* dense,
                                   const StepLinear* head, int64_t E, int64_t H, int64_t D, const float* x, int64_t N,
                                   void* const* caches, int64_t T_self, int64_t self_kt, int self_bf16, int64_t T_cross, int cross_bf16,
                                   const int64_t* self_starts, const int64_t* self_lens, const int64_t* cross_starts,
                                   const int64_t* cross_lens, float* logits) {
    if (N < 0 || E <= 0 || H <= 0 || D <= 0 || H * D != E || self_kt < E || n_layers < 0 || !head || !head->w) return -1;
    if (N == 0) return 0;
    int64_t I = 0;
    for (int64_t i = 0; i < n_layers; ++i) {
        const StepLayer& l = layers[i];
        if (l.qkv.N != 3 * E || l.qkv.K != E || l.o.N != E || l.o.K != E || l.q.N != E || l.q.K != E ||
            l.cross_o.N != E || l.cross_o.K != E || l.fc1.K != E || l.fc2.N != E || l.fc2.K != l.fc1.N)
            return -1;
        I = l.fc1.N > I ? l.fc1.N : I;
    }
    const int64_t W = dense->w ? dense->N : E;
    if ((dense->w && dense->K != E) || head->K != W) return -1;
    int64_t* win = (int64_t*)malloc((size_t)(3 * N * 8));
    if (!win) return -2;
    const int64_t *ss = self_starts, *cs = cross_starts;
    int64_t *sl = win, *slot = win + N, *cl = win + 2 * N;
    for (int64_t n = 0; n < N; ++n) {  // windows cut to the key rows; the new keys' slots must be in range
        slot[n] = ss[n] + self_lens[n] - 1;
        int64_t a = self_lens[n] < T_self - ss[n] ? self_lens[n] : T_self - ss[n];
        sl[n] = a > 0 ? a : 0;
        int64_t c = cross_lens[n] < T_cross - cs[n] ? cross_lens[n] : T_cross - cs[n];
        cl[n] = c > 0 ? c : 0;
        if (slot[n] < 0 || slot[n] >= T_self || ss[n] < 0 || cs[n] < 0) { free(win); return -1; }
    }
    int64_t widest = 3 * E > I ? 3 * E : I;
    widest = widest > W ? widest : W;
    float* buf = (float*)aligned_alloc(64, (size_t)round_up(N * (3 * E + widest) * 4 + 64, 64));
    if (!buf) { free(win); return -2; }
    float *X = buf, *A = X + N * E, *R = A + N * E, *Y = R + N * E;  // stream, attention out, residual LN, wide
    memcpy(X, x, (size_t)(N * E * 4));
    int code = 0;
    for (int64_t i = 0; i < n_layers && code == 0; ++i) {
        const StepLayer& l = layers[i];
        void* const* c = caches + 4 * i;
        if ((code = step_linear(l.qkv, X, E, N, Y, 3 * E, nullptr, nullptr))) break;
        if ((code = encdec_cpu_decode_attention(Y, 3 * E, D, c[0], c[1], self_kt, D, self_bf16, ss, sl, N, H, D,
                                                l.self_scale, A, E, D, Y + E, Y + 2 * E, 3 * E, D, slot, T_self)))
            break;
        if ((code = step_linear(l.o, A, E, N, X, E, X, R))) break;
        if ((code = step_linear(l.q, X, E, N, Y, E, nullptr, nullptr))) break;
        if ((code = encdec_cpu_decode_attention(Y, E, D, c[2], c[3], E, D, cross_bf16, cs, cl, N, H, D,
                                                l.cross_scale, A, E, D, nullptr, nullptr, 0, 0, nullptr, T_cross)))
            break;
        if ((code = step_linear(l.cross_o, A, E, N, X, E, X, R))) break;
        if ((code = step_linear(l.fc1, X, E, N, Y, l.fc1.N, nullptr, nullptr))) break;
        code = step_linear(l.fc2, Y, l.fc1.N, N, X, E, X, R);
    }
    if (code == 0) {
        const float* h = X;
        if (dense->w) {
            code = step_linear(*dense, X, E, N, Y, W, nullptr, nullptr);
            h = Y;
        }
        if (code == 0) code = step_linear(*head, h, W, N, logits, head->N, nullptr, nullptr);
    }
    free(buf);
    free(win);
    return code;
}

// A decode step's bookkeeping after the token choice (decode/ops.py's commit_tokens, which says what each step
// means), row by row instead of ~15 torch ops over the rows. tokens, t, limit, stop_t, pad int64 [N]; alive, busy,
// is_beam, beam_done bool [N]; seq int64 [N, Lc] (row stride ss); eos int64 [N, n_eos] (-1 pads); steps,
// all_stopped_at int64 scalars.
EXPORT int encdec_cpu_commit_tokens(const int64_t* tokens, int64_t* seq, int64_t ss, int64_t Lc, int64_t* t,
                                    const int64_t* limit, uint8_t* alive, const uint8_t* busy, const uint8_t* is_beam,
                                    const uint8_t* beam_done, int64_t* stop_t, const int64_t* pad, const int64_t* eos,
                                    int64_t n_eos, int64_t N, int64_t* steps, int64_t* all_stopped_at) {
    if (N < 0 || Lc < 1 || n_eos < 0 || ss < Lc) return -1;
    bool everyone = true;
    for (int64_t n = 0; n < N; ++n) {
        const bool room = busy[n] && t[n] < limit[n];
        const int64_t tok = alive[n] ? tokens[n] : pad[n];
        bool hit = false;
        for (int64_t e = 0; e < n_eos; ++e) hit |= tok == eos[n * n_eos + e];
        hit = hit && alive[n] && room;
        if (room && !is_beam[n]) seq[n * ss + (t[n] < Lc - 1 ? t[n] : Lc - 1)] = tok;
        alive[n] = alive[n] && !hit;
        t[n] += room ? 1 : 0;
        const bool ended = busy[n] && stop_t[n] == 0 && (is_beam[n] ? beam_done[n] : (!alive[n] || t[n] >= limit[n]));
        if (ended) stop_t[n] = t[n];
        everyone = everyone && (stop_t[n] > 0 || !busy[n]);
    }
    *steps += 1;
    if (everyone && *all_stopped_at == 0) *all_stopped_at = *steps;
    return 0;
}
