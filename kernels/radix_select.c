/* The CPU passes of BatchTopK's radix select over float32 scores (docs/methods.md §1.5, §4.2).
 *
 * crosscoder.kernels.batch_topk compiles this file (native.py) and calls it through ctypes; its plain-PyTorch
 * reference there defines the results, and the tests compare the two. A score's radix key is its float32 bit pattern
 * without the sign bit (31 bits): a non-negative float orders like its key, and -0.0 has the key of 0.0.
 *
 * radix_histogram: counts[d] += the number of entries with a non-zero key whose first prefix_bits key bits equal
 * prefix and whose next digit_bits bits are d (counts: [2**digit_bits] int64, added to). Returns 1 when an entry is
 * not a score (NaN, ±inf, or below zero: the caller then names it), 0 otherwise, -1 when memory ran out.
 *
 * count_at_least, write_at_least: the entries with scores[i] >= bound (an IEEE compare: NaN passes none), in two
 * calls with the same n_threads: the first counts them in each of n_threads shares of [0, n) (share_counts, returns
 * their total), the second writes their positions i (ascending, int64) and scores, each share's after the shares
 * before it.
 *
 * kept_entries: of the entries of scores[n], those whose key is greater than key and the first ties_limit (in
 * index order) whose non-zero key equals it, ascending: each one's label (labels[i], or i where labels is NULL) as
 * the row and the latent of a [*, dict_size] matrix, label = row * dict_size + latent, and its score where
 * kept_scores is not NULL (rows NULL: only counted). Returns how many; *n_ties: how many entries have the key (all
 * of them, kept or not).
 *
 * The histogram and the entries split [0, n) into n_threads contiguous shares run by OpenMP threads (torch's own
 * runtime, already loaded: native.py); the shares' histograms are added. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define KEY_BITS 31
#define KEY_MASK 0x7FFFFFFFu
#define BLOCK 512
/* A thread counts in uint32 (its histograms, 512 KB at 16 bits, then come from the heap, not a fresh mapping) and
 * adds them into the int64 counts at least this often, before a count can overflow. */
#define FLUSHED_EVERY ((int64_t)1 << 31)
#define INFINITY_KEY 0x7F800000u /* the key of +inf; NaNs' are above it */

static inline uint32_t key_of(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits & KEY_MASK;
}

static inline int64_t share_start(int64_t n, int64_t shares, int64_t share) { return n * share / shares; }

/* One share's counts into two interleaved histograms (local[2 * n_bins]): blocks of BLOCK entries are compacted to
 * the digits of the entries counted (a branch-free pass; zeros and other prefixes dropped),
 * then counted alternately into the two, so that runs of one digit (ties) do not wait on each other's increments.
 * With AVX-512, 16 keys at a time: one compare, one compress store of their digits. */
static int count_share(const float *scores, int64_t begin, int64_t end, int64_t prefix, int64_t prefix_bits,
                       int shift, uint32_t digit_mask, int64_t n_bins, uint32_t *local) {
    uint32_t digits[BLOCK];
    int invalid = 0;
    int prefix_shift = (int)(KEY_BITS - prefix_bits);
    for (int64_t first = begin; first < end; first += BLOCK) {
        int64_t size = end - first < BLOCK ? end - first : BLOCK, n = 0, i = 0;
#ifdef __AVX512F__
        __m512i key_mask = _mm512_set1_epi32((int)KEY_MASK), digit_lanes = _mm512_set1_epi32((int)digit_mask);
        __m512i shifts = _mm512_set1_epi32(shift), prefix_shifts = _mm512_set1_epi32(prefix_shift);
        __m512i prefixes = _mm512_set1_epi32((int)prefix), sign = _mm512_set1_epi32((int)~KEY_MASK);
        __m512i infinity = _mm512_set1_epi32((int)INFINITY_KEY);
        for (; i + 16 <= size; i += 16) {
            __m512i raw = _mm512_loadu_si512(scores + first + i), keys = _mm512_and_si512(raw, key_mask);
            __mmask16 counted = _mm512_test_epi32_mask(keys, keys);
            invalid |= (_mm512_test_epi32_mask(raw, sign) & counted) | _mm512_cmpge_epu32_mask(keys, infinity);
            if (prefix_bits) counted &= _mm512_cmpeq_epi32_mask(_mm512_srlv_epi32(keys, prefix_shifts), prefixes);
            __m512i lane_digits = _mm512_and_si512(_mm512_srlv_epi32(keys, shifts), digit_lanes);
            _mm512_mask_compressstoreu_epi32(digits + n, counted, lane_digits);
            n += __builtin_popcount(counted);
        }
#endif
        for (; i < size; ++i) {
            uint32_t key = key_of(scores[first + i]);
            invalid |= (key != 0 && signbit(scores[first + i])) || key >= INFINITY_KEY;
            /* no prefix: every non-zero key counts (a shift by 31 would leave 0 anyway) */
            int counted = key != 0 && (prefix_bits == 0 || (int64_t)(key >> prefix_shift) == prefix);
            digits[n] = (key >> shift) & digit_mask;
            n += counted;
        }
        for (i = 0; i + 2 <= n; i += 2) {
            ++local[digits[i]];
            ++local[n_bins + digits[i + 1]];
        }
        if (i < n) ++local[digits[i]];
    }
    return invalid != 0;
}

/* Adds a thread's two histograms into counts and clears them. */
static void add_counts(int64_t *counts, uint32_t *local, int64_t n_bins) {
#pragma omp critical
    for (int64_t bin = 0; bin < n_bins; ++bin) counts[bin] += (int64_t)local[bin] + local[n_bins + bin];
    memset(local, 0, (size_t)(2 * n_bins) * sizeof(uint32_t));
}

int64_t radix_histogram(const float *scores, int64_t n, int64_t prefix, int64_t prefix_bits, int64_t digit_bits,
                        int64_t *counts, int64_t n_threads) {
    int64_t n_bins = (int64_t)1 << digit_bits;
    int shift = (int)(KEY_BITS - prefix_bits - digit_bits);
    if (n_threads < 1) n_threads = 1;
    int failed = 0, invalid = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : invalid)
    {
        uint32_t *local = calloc((size_t)(2 * n_bins), sizeof(uint32_t));
#pragma omp atomic
        failed += local == NULL;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t share = 0; share < n_threads; ++share) {
                int64_t end = share_start(n, n_threads, share + 1);
                for (int64_t from = share_start(n, n_threads, share); from < end; from += FLUSHED_EVERY) {
                    int64_t to = end - from < FLUSHED_EVERY ? end : from + FLUSHED_EVERY;
                    invalid |= count_share(scores, from, to, prefix, prefix_bits, shift, (uint32_t)(n_bins - 1),
                                           n_bins, local);
                    add_counts(counts, local, n_bins);
                }
            }
        }
        free(local);
    }
    return failed ? -1 : invalid;
}

int64_t count_at_least(const float *scores, int64_t n, float bound, int64_t *share_counts, int64_t n_threads) {
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t share = 0; share < n_threads; ++share) {
        int64_t count = 0, i = share_start(n, n_threads, share), end = share_start(n, n_threads, share + 1);
#ifdef __AVX512F__
        __m512 bounds = _mm512_set1_ps(bound);
        for (; i + 16 <= end; i += 16)
            count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(scores + i), bounds, _CMP_GE_OQ));
#endif
        for (; i < end; ++i) count += scores[i] >= bound;
        share_counts[share] = count;
    }
    int64_t total = 0;
    for (int64_t share = 0; share < n_threads; ++share) total += share_counts[share];
    return total;
}

void write_at_least(const float *scores, int64_t n, float bound, const int64_t *share_counts, int64_t *positions,
                    float *selected, int64_t n_threads) {
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t share = 0; share < n_threads; ++share) {
        int64_t at = 0, i = share_start(n, n_threads, share), end = share_start(n, n_threads, share + 1);
        for (int64_t before = 0; before < share; ++before) at += share_counts[before];
#ifdef __AVX512F__
        __m512 bounds = _mm512_set1_ps(bound);
        __m512i low_lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
        for (; i + 16 <= end; i += 16) {
            __m512 values = _mm512_loadu_ps(scores + i);
            __mmask16 passed = _mm512_cmp_ps_mask(values, bounds, _CMP_GE_OQ);
            if (!passed) continue;
            __m512i low = _mm512_add_epi64(_mm512_set1_epi64(i), low_lanes);
            _mm512_mask_compressstoreu_epi64(positions + at, (__mmask8)passed, low);
            _mm512_mask_compressstoreu_epi64(positions + at + __builtin_popcount(passed & 0xFF),
                                             (__mmask8)(passed >> 8), _mm512_add_epi64(low, eight));
            _mm512_mask_compressstoreu_ps(selected + at, passed, values);
            at += __builtin_popcount(passed);
        }
#endif
        for (; i < end; ++i) {
            if (scores[i] >= bound) {
                positions[at] = i;
                selected[at++] = scores[i];
            }
        }
    }
}

int64_t kept_entries(const float *scores, const int64_t *labels, int64_t n, int64_t key, int64_t ties_limit,
                     int64_t dict_size, int64_t *rows, int64_t *latents, float *kept_scores, int64_t *n_ties) {
    int64_t count = 0, ties = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t entry_key = key_of(scores[i]);
        int keep = entry_key > key;
        if (entry_key == key && entry_key != 0) keep = ties++ < ties_limit;
        if (keep && rows) {
            int64_t label = labels ? labels[i] : i, row = label / dict_size;
            rows[count] = row;
            latents[count] = label - row * dict_size;
            if (kept_scores) kept_scores[count] = scores[i];
        }
        count += keep;
    }
    *n_ties = ties;
    return count;
}
