/* The C ABI of libencdec_cuda: what encdec_fast/csrc.py binds with ctypes.
 *
 * Every launcher takes raw device pointers, sizes and the CUDA stream (torch's current stream, as a
 * pointer-sized integer), launches its kernel(s) on that stream and returns the cudaError_t of the
 * launch (0 = success). Launchers never allocate, synchronise or query the device, so a CUDA graph
 * captured around them records their kernels like any other; whatever state a decode step keeps
 * (token buffer, per-row lengths, processor tables) is read from device memory the caller owns.
 *
 * Bump ENCDEC_ABI_VERSION (and csrc.py's ABI_VERSION) whenever a signature, an enum or the layout
 * of encdec_select_params changes: the loader refuses a library whose version differs.
 */
#ifndef ENCDEC_ABI_H
#define ENCDEC_ABI_H

#include <stddef.h>
#include <stdint.h>

#define ENCDEC_ABI_VERSION 3
#define ENCDEC_EXPORT extern "C" __attribute__((visibility("default")))

/* element types of the scores (logits) the selection kernels read */
enum encdec_dtype { ENCDEC_F32 = 0, ENCDEC_F16 = 1, ENCDEC_BF16 = 2 };

/* The deterministic logits processors of decode/select.py's process(), over its per-row device tables
 * (RowTables), for row r of a launch. Per-row tables are read at [r * *_stride] (a stride of 0 shares one
 * value); (rows, vocab) bool tables have unit column stride. A NULL table turns its processor off for every
 * row, as a processor left out of decode/select.py's Spec is skipped:
 *   penalty + seen   repetition penalty: tokens the row holds (seen[r, v]) are penalised,
 *                    s < 0 ? s * penalty : s / penalty
 *   ngram            no-repeat n-gram size per row, for the sizes set in ngram_sizes (bit n: size n)
 *   ban              single-token bad words
 *   bad_*            multi-token bad words: word g (a prefix of bad_plen[g] tokens, then bad_last[g]) bans
 *                    bad_last[g] in a row r with bad_owner[r, g] whose tokens end with the prefix
 *   min_len + eos    the row's eos ids (padded with -1) are banned while it holds fewer than min_len tokens
 * Row r holds tokens ids[r * ids_stride + j] for j < lens[r * lens_stride] (a fixed token buffer and
 * per-row counts: decode/state.py's seq and t). */
typedef struct {
    const int64_t* ids;          /* token buffer, int64, unit column stride */
    int64_t ids_stride;
    const int64_t* lens;         /* tokens per row */
    int64_t lens_stride;
    const float* penalty;        /* repetition penalty per row (NULL: off) */
    int64_t penalty_stride;
    const uint8_t* seen;         /* (rows, vocab) bool: tokens the row holds (read where penalty is on) */
    int64_t seen_stride;
    const int64_t* ngram;        /* no_repeat_ngram_size per row (NULL or ngram_sizes == 0: off) */
    int64_t ngram_stride;
    uint64_t ngram_sizes;        /* bit n set: rows whose ngram is n ban repeats (1 <= n < 64) */
    const uint8_t* ban;          /* (rows, vocab) bool single-token bans (NULL: off) */
    int64_t ban_stride;
    const int64_t* min_len;      /* eos ids banned while lens < min_len (NULL: off) */
    int64_t min_len_stride;
    const int64_t* eos;          /* (rows, n_eos) eos ids per row, -1 padded */
    int64_t eos_stride;
    int32_t n_eos;
    int32_t n_bad;               /* multi-token bad words (0: off) */
    const int64_t* bad_prefix;   /* (n_bad, >= max bad_plen) prefixes, left-aligned, row stride bad_prefix_stride */
    int64_t bad_prefix_stride;
    const int64_t* bad_plen;     /* (n_bad,) prefix lengths (>= 1) */
    const int64_t* bad_last;     /* (n_bad,) the banned last tokens */
    const uint8_t* bad_owner;    /* (rows, n_bad) bool: row r applies word g */
    int64_t bad_owner_stride;
} encdec_select_params;

/* Largest vocabulary the selection kernels take (two V-bit masks, 40 KiB, in a block's 48 KiB of
 * shared memory beside the kernels' own 4 KiB). */
#define ENCDEC_SELECT_MAX_VOCAB 163840
/* Largest k of encdec_select_beam, and most beams per request. */
#define ENCDEC_BEAM_MAX_K 32
#define ENCDEC_BEAM_MAX_BEAMS 32

ENCDEC_EXPORT int encdec_abi_version(void);
ENCDEC_EXPORT size_t encdec_select_params_size(void);
ENCDEC_EXPORT const char* encdec_error_string(int err);
/* cudaGetDeviceCount: 0 and *count on success; without a driver, 35 (cudaErrorInsufficientDriver). */
ENCDEC_EXPORT int encdec_probe(int* count);

/* Greedy choice: out[r] = argmax_v processed(scores[r, v]) (first index among equal maxima, NaN
 * counts as the maximum, as torch.argmax), processors from p; scores [rows, vocab] row stride ld. */
ENCDEC_EXPORT int encdec_select_greedy(const void* scores, int64_t ld, int rows, int vocab, int dtype,
                                       const encdec_select_params* p, int64_t* out, void* stream);

/* One beam-search step's candidates (decode/beam.py's BeamGroup: request b's beams are rows b * beams + j):
 *   acc[b, j * vocab + v] = processed(log_softmax(logits[r])[v]) + running[r],  r = b * beams + j,
 * running [requests, beams] contiguous,
 * and out_scores[b, :k], out_index[b, :k] = its top k (descending; equal scores: lower index first).
 * cand_scores/cand_index [requests * beams, k] are scratch (each row's own top k). */
ENCDEC_EXPORT int encdec_select_beam(const void* logits, int64_t ld, int requests, int beams, int vocab, int dtype,
                                     const encdec_select_params* p, const float* running, int k,
                                     float* cand_scores, int32_t* cand_index, float* out_scores,
                                     int64_t* out_index, void* stream);

#endif
