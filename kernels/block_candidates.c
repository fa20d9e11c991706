/* The blocked CPU selection's candidates: each block of encoder pre-activations scanned in one pass, and the blocks'
 * candidates merged into the whole score matrix's row-major order (docs/methods.md §4.2).
 *
 * crosscoder.kernels.block_candidates compiles this file (native.py) and calls it through ctypes; its plain-PyTorch
 * reference there defines the results, and the tests compare the two.
 *
 * block_candidates: for a block of products[rows, width] (row-major float32), per-column biases (or none), bounds
 * (or one scalar bound) and code norms c (or none: c = 1) and a threshold t > 0, the pre-activations are
 * pre[r, j] = products[r, j] + bias_j (one float32 sum, as torch adds them) and the candidates the entries with
 *     pre[r, j] >= bound_j   and   score = ReLU(pre[r, j]) * c_j >= t,
 * in row-major order: their flat positions r * width + j (int32), their scores, and each row's count (int64).
 * Comparisons are IEEE (NaN passes none); the score is one float32 product, as torch forms it. *non_finite is set
 * to 1 when a pre-activation is NaN or +inf or a candidate's score is +inf (else left alone): the caller checks the
 * block then, as the whole matrix's selection would.
 * The rows are split into n_threads shares scanned by OpenMP threads — torch's own OpenMP runtime, already loaded
 * (threads of one's own would compete with its workers, which spin a while after each parallel region); each share
 * writes into its own part of the outputs (capacity / n_threads entries), and the parts are then moved together.
 * Returns the number of candidates, or, when a share overflowed, minus the capacity that would have held every
 * share (the counts are complete either way; call again with it).
 *
 * merge_candidates: the candidates of n_blocks blocks of ascending latents (block b: first latent first[b], width
 * widths[b], sizes[b] candidates, positions and scores at the addresses positions[b] and scores[b], per-row counts
 * counts[b, :]) into
 * flat indices r * dict_size + latent (int64) and scores in row-major order over the [batch, dict_size] matrix: a
 * counting sort by row (row r's candidates of block b follow its candidates of the blocks before b). counts is
 * overwritten with where each block's rows start. Returns the number of candidates.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef struct {
    const float *pre; /* the products; the bias is added as they are read */
    const float *bias; /* [width], or NULL: none */
    int64_t width, row_begin, row_end;
    const float *bounds; /* [width], or NULL: scalar_bound for every column */
    float scalar_bound;
    const float *norms; /* [width], or NULL: c = 1 */
    float threshold;
    int32_t *positions;
    float *scores;
    int64_t capacity; /* this share's */
    int64_t *row_counts;
    int64_t found;
    int non_finite;
} Share;

static inline int64_t keep_if_reaching(Share *s, int64_t row, int64_t column, int64_t n) {
    float value = s->pre[row * s->width + column];
    if (s->bias) value += s->bias[column];
    float score = value > 0.0f ? value : 0.0f;
    if (s->norms) score *= s->norms[column];
    if (!(score >= s->threshold)) return n;
    if (score == __builtin_inff()) s->non_finite = 1;
    if (n < s->capacity) {
        s->positions[n] = (int32_t)(row * s->width + column);
        s->scores[n] = score;
    }
    return n + 1;
}

static void scan_rows(Share *s) {
    int64_t n = 0;
    for (int64_t row = s->row_begin; row < s->row_end; ++row) {
        const float *values = s->pre + row * s->width;
        int64_t before = n, column = 0;
#ifdef __AVX512F__
        __m512 scalar = _mm512_set1_ps(s->scalar_bound), infinity = _mm512_set1_ps(__builtin_inff());
        __mmask16 not_finite = 0;
        for (; column + 16 <= s->width; column += 16) {
            __m512 bound = s->bounds ? _mm512_loadu_ps(s->bounds + column) : scalar;
            __m512 value = _mm512_loadu_ps(values + column);
            if (s->bias) value = _mm512_add_ps(value, _mm512_loadu_ps(s->bias + column));
            not_finite |= _mm512_cmp_ps_mask(value, infinity, _CMP_NLT_UQ); /* NaN or +inf */
            __mmask16 passed = _mm512_cmp_ps_mask(value, bound, _CMP_GE_OQ);
            while (passed) {
                int lane = __builtin_ctz(passed);
                passed &= passed - 1;
                n = keep_if_reaching(s, row, column + lane, n);
            }
        }
        if (not_finite) s->non_finite = 1;
#endif
        for (; column < s->width; ++column) {
            float bound = s->bounds ? s->bounds[column] : s->scalar_bound;
            float value = s->bias ? values[column] + s->bias[column] : values[column];
            if (!(value < __builtin_inff())) s->non_finite = 1;
            if (value >= bound) n = keep_if_reaching(s, row, column, n);
        }
        s->row_counts[row] = n - before;
    }
    s->found = n;
}

int64_t block_candidates(const float *pre, const float *bias, int64_t rows, int64_t width, const float *bounds,
                         float scalar_bound,
                         const float *norms, float threshold, int32_t *positions, float *scores, int64_t capacity,
                         int64_t *row_counts, int64_t n_threads, int32_t *non_finite) {
    enum { MAX_THREADS = 64 };
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > rows) n_threads = rows > 0 ? rows : 1;
    Share shares[MAX_THREADS];
    int64_t share_capacity = capacity / n_threads;
#pragma omp parallel for schedule(static, 1) num_threads(n_threads)
    for (int64_t t = 0; t < n_threads; ++t) {
        Share *s = &shares[t];
        s->pre = pre;
        s->bias = bias;
        s->width = width;
        s->row_begin = rows * t / n_threads;
        s->row_end = rows * (t + 1) / n_threads;
        s->bounds = bounds;
        s->scalar_bound = scalar_bound;
        s->norms = norms;
        s->threshold = threshold;
        s->positions = positions + t * share_capacity;
        s->scores = scores + t * share_capacity;
        s->capacity = share_capacity;
        s->row_counts = row_counts;
        s->non_finite = 0;
        scan_rows(s);
    }
    int64_t total = 0, largest = 0;
    for (int64_t t = 0; t < n_threads; ++t) {
        total += shares[t].found;
        if (shares[t].found > largest) largest = shares[t].found;
        if (shares[t].non_finite) *non_finite = 1;
    }
    if (largest > share_capacity) return -largest * n_threads;
    int64_t placed = shares[0].found;
    for (int64_t t = 1; t < n_threads; ++t) {
        memmove(positions + placed, shares[t].positions, shares[t].found * sizeof(int32_t));
        memmove(scores + placed, shares[t].scores, shares[t].found * sizeof(float));
        placed += shares[t].found;
    }
    return total;
}

int64_t merge_candidates(int64_t n_blocks, const int64_t *first, const int64_t *widths, const int64_t *sizes,
                         const int64_t *positions, const int64_t *scores, int64_t *counts, int64_t batch,
                         int64_t dict_size, int64_t *flat_out, float *scores_out, int64_t n_threads) {
    int64_t total = 0;
    for (int64_t row = 0; row < batch; ++row) {
        for (int64_t b = 0; b < n_blocks; ++b) {
            int64_t count = counts[b * batch + row];
            counts[b * batch + row] = total;
            total += count;
        }
    }
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int32_t *block_positions = (const int32_t *)(intptr_t)positions[b];
        const float *block_scores = (const float *)(intptr_t)scores[b];
        int64_t *next = counts + b * batch, width = widths[b];
        for (int64_t i = 0; i < sizes[b]; ++i) {
            int64_t row = block_positions[i] / width, column = block_positions[i] - row * width;
            int64_t destination = next[row]++;
            flat_out[destination] = row * dict_size + first[b] + column;
            scores_out[destination] = block_scores[i];
        }
    }
    return total;
}
