/* Token selection for the decode step: the deterministic logits processors fused with greedy argmax,
 * and beam search's candidate selection (log-softmax + processors + running beam scores, top k).
 *
 * One block per row. The processors of decode/select.py touch few tokens, so a row's block first builds
 * two V-bit masks in shared memory:
 *   seen    the row's `seen` table (tokens it holds), packed with one warp ballot per 32 tokens, where
 *           the row's repetition penalty is not 1,
 *   banned  the row's single-token bans (its `ban` table, packed the same way), tokens that would repeat
 *           an n-gram of the row's size, the last token of each multi-token bad word the row owns whose
 *           prefix ends its sequence, its eos ids while it holds fewer than min_len tokens;
 * then streams the scores once (16-byte loads) and scores token v as
 *   banned ? -inf : seen ? (s < 0 ? s * penalty : s / penalty) : s
 * which is what process() gives in its order (a penalty never turns -inf into a number; IEEE division,
 * as torch divides by the per-row penalty tensor). Greedy keeps the best (score, index) in the order of
 * torch.argmax (first index among equal maxima, NaN first). Beam search first computes the row's
 * log-sum-exp, then keeps each thread's top k of (log_softmax + processors + running score), merges them
 * per warp and per block, and a second small kernel merges the rows of a request (top k over beams x
 * vocab, equal scores: lower index first).
 *
 * References: ops.select_greedy (decode/select.py's process on fp32, then greedy) and ops.select_beam
 * (log_softmax, process, running scores, torch.topk: what decode/beam.py's BeamGroup.step takes).
 */
#include "device_utils.h"

namespace encdec {
namespace {

constexpr int THREADS = 512;
constexpr int NWARPS = THREADS / 32;
constexpr int32_t NO_INDEX = 0x7fffffff;  // an empty candidate slot: loses to every real candidate

__device__ __forceinline__ void mark(uint32_t* mask, int64_t tok, int vocab) {
    if (tok >= 0 && tok < vocab) atomicOr(&mask[tok >> 5], 1u << (tok & 31));
}

/* Row `row` of a (rows, vocab) bool table as a V-bit mask: warp w packs words w, w + NWARPS, ... (one
 * ballot over 32 consecutive bytes each); a NULL table gives zeros. */
__device__ __forceinline__ void pack_bits(const uint8_t* row, int vocab, uint32_t* mask) {
    const int words = (vocab + 31) >> 5, lane = threadIdx.x & 31;
    for (int w = threadIdx.x >> 5; w < words; w += NWARPS) {  // whole warps: every lane takes the ballot
        const int v = (w << 5) + lane;
        const uint32_t bits = row ? __ballot_sync(FULL_MASK, v < vocab && row[v] != 0) : 0u;
        if (lane == 0) mask[w] = bits;
    }
}

/* Fills row r's seen / banned masks (both in shared memory); returns the row's length. */
__device__ int64_t build_masks(const encdec_select_params& p, int r, int vocab, float penalty, uint32_t* seen,
                               uint32_t* banned) {
    pack_bits(penalty != 1.f ? p.seen + r * p.seen_stride : nullptr, vocab, seen);  // penalty 1: identity
    pack_bits(p.ban ? p.ban + r * p.ban_stride : nullptr, vocab, banned);
    __syncthreads();
    const int64_t len = p.lens[r * p.lens_stride];
    const int64_t* ids = p.ids + r * p.ids_stride;  // [len]
    const int64_t n = p.ngram && p.ngram_sizes ? p.ngram[r * p.ngram_stride] : 0;
    if (n > 0 && n < 64 && ((p.ngram_sizes >> n) & 1u) && len >= n) {
        // window i bans ids[i + n - 1] when ids[i : i + n - 1] equals the last n - 1 tokens
        const int64_t* tail = ids + len - n + 1;
        for (int64_t i = threadIdx.x; i <= len - n; i += blockDim.x) {
            bool match = true;
            for (int q = 0; q < n - 1 && match; ++q) match = ids[i + q] == tail[q];
            if (match) mark(banned, ids[i + n - 1], vocab);
        }
    }
    for (int g = threadIdx.x; g < p.n_bad; g += blockDim.x) {
        const int64_t plen = p.bad_plen[g];
        if (!p.bad_owner[r * p.bad_owner_stride + g] || plen > len) continue;
        const int64_t* prefix = p.bad_prefix + g * p.bad_prefix_stride;
        bool match = true;
        for (int64_t q = 0; q < plen && match; ++q) match = ids[len - plen + q] == prefix[q];
        if (match) mark(banned, p.bad_last[g], vocab);
    }
    if (p.min_len && len < p.min_len[r * p.min_len_stride])
        for (int e = threadIdx.x; e < p.n_eos; e += blockDim.x) mark(banned, p.eos[r * p.eos_stride + e], vocab);
    __syncthreads();
    return len;
}

__device__ __forceinline__ float process(float s, int v, const uint32_t* seen, const uint32_t* banned, float penalty) {
    const uint32_t bit = 1u << (v & 31);
    if (banned[v >> 5] & bit) return -INFINITY;
    if (seen[v >> 5] & bit) return s < 0.f ? s * penalty : s / penalty;
    return s;
}

/* f(v, score) for every v < vocab of one row; the aligned middle of the row in 16-byte loads. */
template <typename T, typename F>
__device__ __forceinline__ void for_each_score(const T* row, int vocab, F&& f) {
    constexpr int VEC = 16 / sizeof(T);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    const int head = addr % sizeof(T) ? vocab : min(vocab, static_cast<int>(((16 - addr % 16) % 16) / sizeof(T)));
    for (int v = threadIdx.x; v < head; v += blockDim.x) f(v, to_float(row[v]));
    const int nvec = (vocab - head) / VEC;
    const T* body = row + head;  // 16-byte aligned
#pragma unroll 2
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        const uint4 u = load16(body + j * VEC);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int q = 0; q < VEC; ++q) f(head + j * VEC + q, to_float(e[q]));
    }
    for (int v = head + nvec * VEC + threadIdx.x; v < vocab; v += blockDim.x) f(v, to_float(row[v]));
}

__device__ __forceinline__ float row_penalty(const encdec_select_params& p, int r) {
    return p.penalty ? p.penalty[r * p.penalty_stride] : 1.f;  // NULL: off for every row
}

template <typename T>
__global__ void __launch_bounds__(THREADS) greedy_kernel(const T* scores, int64_t ld, int vocab,
                                                         encdec_select_params p, int64_t* out) {
    extern __shared__ uint32_t masks[];  // [2, words]: seen, banned
    __shared__ float warp_v[NWARPS];
    __shared__ int64_t warp_i[NWARPS];
    const int r = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint32_t* seen = masks;
    uint32_t* banned = masks + ((vocab + 31) >> 5);
    const float penalty = row_penalty(p, r);
    build_masks(p, r, vocab, penalty, seen, banned);

    float bv = -INFINITY;
    int64_t bi = INT64_MAX;
    for_each_score(scores + r * ld, vocab, [&](int v, float s) {
        s = process(s, v, seen, banned, penalty);
        if (better(s, v, bv, bi)) bv = s, bi = v;
    });
    warp_best(bv, bi);
    if (lane == 0) warp_v[warp] = bv, warp_i[warp] = bi;
    __syncthreads();
    if (warp != 0) return;
    bv = lane < NWARPS ? warp_v[lane] : -INFINITY;
    bi = lane < NWARPS ? warp_i[lane] : INT64_MAX;
    warp_best(bv, bi);
    if (lane == 0) out[r] = bi;
}

/* (v, i) into a best-first list of K, if it beats the last entry; unrolled, so the list stays in registers */
template <int K>
__device__ __forceinline__ void insert(float (&lv)[K], int32_t (&li)[K], float v, int32_t i) {
    if (!better(v, i, lv[K - 1], li[K - 1])) return;
    bool placed = false;
#pragma unroll
    for (int q = K - 1; q >= 0; --q) {
        if (placed) continue;
        if (q > 0 && better(v, i, lv[q - 1], li[q - 1])) {
            lv[q] = lv[q - 1], li[q] = li[q - 1];
        } else {
            lv[q] = v, li[q] = i, placed = true;
        }
    }
}

template <int K>
__device__ __forceinline__ void pop_front(float (&lv)[K], int32_t (&li)[K]) {
#pragma unroll
    for (int q = 0; q < K - 1; ++q) lv[q] = lv[q + 1], li[q] = li[q + 1];
    lv[K - 1] = -INFINITY, li[K - 1] = NO_INDEX;
}

/* Row r = request * beams + j: its own top k of acc = processed(log_softmax(logits[r])) + running[r],
 * indices j * vocab + v, best first, into cand_*[r, :k]. KMAX >= k: the per-thread list length. */
template <typename T, int KMAX>
__global__ void __launch_bounds__(THREADS) beam_rows_kernel(const T* logits, int64_t ld, int beams, int vocab,
                                                            encdec_select_params p, const float* running, int k,
                                                            float* cand_scores, int32_t* cand_index) {
    extern __shared__ uint32_t masks[];  // [2, words]: seen, banned
    __shared__ float red_m[NWARPS], red_s[NWARPS];
    __shared__ float list_v[NWARPS][KMAX];
    __shared__ int32_t list_i[NWARPS][KMAX];
    const int r = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint32_t* seen = masks;
    uint32_t* banned = masks + ((vocab + 31) >> 5);
    const float penalty = row_penalty(p, r);
    build_masks(p, r, vocab, penalty, seen, banned);
    const T* row = logits + r * ld;

    // pass 1: log-sum-exp of the raw logits (online max and sum per thread, then merged)
    float m = -INFINITY, s = 0.f;
    for_each_score(row, vocab, [&](int, float x) {
        if (x > m) {
            s = (m == -INFINITY ? 0.f : s * expf(m - x)) + 1.f;
            m = x;
        } else if (x != -INFINITY) {
            s += expf(x - m);
        }
    });
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float om = __shfl_xor_sync(FULL_MASK, m, off), os = __shfl_xor_sync(FULL_MASK, s, off);
        lse_merge(m, s, om, os);
    }
    if (lane == 0) red_m[warp] = m, red_s[warp] = s;
    __syncthreads();
    m = red_m[0], s = red_s[0];
    for (int w2 = 1; w2 < NWARPS; ++w2) lse_merge(m, s, red_m[w2], red_s[w2]);  // same order in every thread
    const float log_sum = logf(s);

    // pass 2: each thread's top KMAX of the processed, beam-scored log-probabilities
    const float run = running[r];
    const int32_t base = (r % beams) * vocab;
    float lv[KMAX];
    int32_t li[KMAX];
#pragma unroll
    for (int q = 0; q < KMAX; ++q) lv[q] = -INFINITY, li[q] = NO_INDEX;
    // scalar, coalesced loads of a row pass 1 just brought into cache: one copy of the unrolled insert
#pragma unroll 1
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float lp = process((to_float(row[v]) - m) - log_sum, v, seen, banned, penalty) + run;
        insert(lv, li, lp, base + v);
    }

    // warp: k rounds of "best head wins, its lane pops"; then warp 0 merges the warps' lists
    for (int q = 0; q < k; ++q) {
        float hv = lv[0];
        int64_t hi = li[0];
        warp_best(hv, hi);
        if (li[0] == hi && hi != NO_INDEX) pop_front(lv, li);  // indices are unique within a row
        if (lane == 0) list_v[warp][q] = hv, list_i[warp][q] = static_cast<int32_t>(hi);
    }
    __syncthreads();
    if (warp != 0) return;
    int at = 0;  // lane w < NWARPS walks warp w's list
    for (int q = 0; q < k; ++q) {
        const bool has = lane < NWARPS && at < k;
        float hv = has ? list_v[lane][at] : -INFINITY;
        int64_t hi = has ? list_i[lane][at] : NO_INDEX;
        const int64_t mine = hi;
        warp_best(hv, hi);
        if (has && mine == hi) ++at;
        if (lane == 0) cand_scores[r * k + q] = hv, cand_index[r * k + q] = static_cast<int32_t>(hi);
    }
}

/* One warp per request: top k over its beams' candidate lists (lane j walks beam j's list). */
__global__ void beam_merge_kernel(int requests, int beams, int k, const float* cand_scores,
                                  const int32_t* cand_index, float* out_scores, int64_t* out_index) {
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= requests) return;
    const int64_t row = static_cast<int64_t>(b) * beams + lane;
    int at = 0;
    for (int q = 0; q < k; ++q) {
        const bool has = lane < beams && at < k;
        float hv = has ? cand_scores[row * k + at] : -INFINITY;
        int64_t hi = has ? cand_index[row * k + at] : NO_INDEX;
        const int64_t mine = hi;
        warp_best(hv, hi);
        if (has && mine == hi) ++at;
        if (lane == 0) out_scores[static_cast<int64_t>(b) * k + q] = hv, out_index[static_cast<int64_t>(b) * k + q] = hi;
    }
}

/* the tables a non-NULL or non-zero field promises are there */
bool params_ok(const encdec_select_params* p) {
    return p != nullptr && p->ids != nullptr && p->lens != nullptr && (p->penalty == nullptr || p->seen != nullptr) &&
           (p->min_len == nullptr || p->n_eos == 0 || p->eos != nullptr) && p->n_eos >= 0 && p->n_bad >= 0 &&
           (p->n_bad == 0 || (p->bad_prefix && p->bad_plen && p->bad_last && p->bad_owner));
}

size_t mask_bytes(int vocab) { return 2 * sizeof(uint32_t) * ((vocab + 31) / 32); }

template <typename T>
void launch_greedy(const void* scores, int64_t ld, int rows, int vocab, const encdec_select_params& p, int64_t* out,
                   cudaStream_t st) {
    greedy_kernel<T><<<rows, THREADS, mask_bytes(vocab), st>>>(static_cast<const T*>(scores), ld, vocab, p, out);
}

template <typename T>
void launch_beam_rows(const void* logits, int64_t ld, int rows, int beams, int vocab, const encdec_select_params& p,
                      const float* running, int k, float* cs, int32_t* ci, cudaStream_t st) {
    const T* x = static_cast<const T*>(logits);
    const size_t smem = mask_bytes(vocab);
    if (k <= 8)
        beam_rows_kernel<T, 8><<<rows, THREADS, smem, st>>>(x, ld, beams, vocab, p, running, k, cs, ci);
    else if (k <= 16)
        beam_rows_kernel<T, 16><<<rows, THREADS, smem, st>>>(x, ld, beams, vocab, p, running, k, cs, ci);
    else
        beam_rows_kernel<T, 32><<<rows, THREADS, smem, st>>>(x, ld, beams, vocab, p, running, k, cs, ci);
}

}  // namespace
}  // namespace encdec

ENCDEC_EXPORT int encdec_select_greedy(const void* scores, int64_t ld, int rows, int vocab, int dtype,
                                       const encdec_select_params* p, int64_t* out, void* stream) {
    using namespace encdec;
    if (rows < 1 || vocab < 1 || vocab > ENCDEC_SELECT_MAX_VOCAB || !params_ok(p))
        return static_cast<int>(cudaErrorInvalidValue);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case ENCDEC_F32: launch_greedy<float>(scores, ld, rows, vocab, *p, out, st); break;
        case ENCDEC_F16: launch_greedy<__half>(scores, ld, rows, vocab, *p, out, st); break;
        case ENCDEC_BF16: launch_greedy<__nv_bfloat16>(scores, ld, rows, vocab, *p, out, st); break;
        default: return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(cudaGetLastError());
}

ENCDEC_EXPORT int encdec_select_beam(const void* logits, int64_t ld, int requests, int beams, int vocab, int dtype,
                                     const encdec_select_params* p, const float* running, int k,
                                     float* cand_scores, int32_t* cand_index, float* out_scores,
                                     int64_t* out_index, void* stream) {
    using namespace encdec;
    if (requests < 1 || beams < 1 || beams > ENCDEC_BEAM_MAX_BEAMS || vocab < 1 ||
        vocab > ENCDEC_SELECT_MAX_VOCAB || k < 1 || k > ENCDEC_BEAM_MAX_K ||
        static_cast<int64_t>(beams) * vocab < k || !params_ok(p))
        return static_cast<int>(cudaErrorInvalidValue);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int rows = requests * beams;
    switch (dtype) {
        case ENCDEC_F32: launch_beam_rows<float>(logits, ld, rows, beams, vocab, *p, running, k, cand_scores, cand_index, st); break;
        case ENCDEC_F16: launch_beam_rows<__half>(logits, ld, rows, beams, vocab, *p, running, k, cand_scores, cand_index, st); break;
        case ENCDEC_BF16: launch_beam_rows<__nv_bfloat16>(logits, ld, rows, beams, vocab, *p, running, k, cand_scores, cand_index, st); break;
        default: return static_cast<int>(cudaErrorInvalidValue);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    constexpr int MERGE_WARPS = 4;
    beam_merge_kernel<<<(requests + MERGE_WARPS - 1) / MERGE_WARPS, MERGE_WARPS * 32, 0, st>>>(
        requests, beams, k, cand_scores, cand_index, out_scores, out_index);
    return static_cast<int>(cudaGetLastError());
}
