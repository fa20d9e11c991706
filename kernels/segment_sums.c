/* Segmented sums of value-weighted table rows on the CPU, float32 (docs/methods.md §4.4): the sparse decode
 * (segments: the codes' rows) and the sparse backward's weight gradients dW_dec and dW_enc (segments: the latents).
 *
 * crosscoder.kernels.sparse_decode compiles this file (native.py) and calls segment_sums() through ctypes; its
 * plain-PyTorch references there (embedding_bag for the rows, MKL's sparse x dense product for the latents, sampled
 * products for the dots) define the results to rounding (the entries are added in another order), and the tests
 * compare them.
 *
 * segment_sums: out[s, :] = sum over p in [offsets[s], offsets[s + 1]) of values[at(order, p)] * table[index[p], :]
 * for every segment s < n_segments (order: NULL for entries in value order); a segment without entries gets a zero
 * row. Each row is summed in a buffer of its thread's, the entries in order (acc = acc + v * t: the product rounded,
 * then the sum; four entries per sweep over the row), then stored. With stream, where the output row is 64-byte
 * aligned and the CPU has AVX-512, the stores are non-temporal: the latents' [F, D] output — 1.36 GB at the paper's
 * width, mostly zero rows, read again only by the optimizer — is written without first being read into the cache,
 * which halved the time (95 -> 51 ms on the development machine's 2 cores); a decode's output, read at once, is
 * stored plainly. Segments are dealt to OpenMP threads (torch's runtime, already loaded) in chunks. Plain arithmetic
 * loops the compiler vectorises: every build computes the same values. Returns 0, or -1 when a thread's buffer could
 * not be allocated (nothing written then).
 * With dot_rows [n_segments, width] (else NULL): with dots (else NULL) the same sweep also writes each entry's dot
 * product with its segment's row, dots[at(order, p)] = <table[index[p], :], dot_rows[s, :]> (the sparse decode's
 * backward: dvalues beside dW_dec, the rows of dout read once for both; LANES partial sums with fmaf, summed in lane
 * order); with project each sum is stored without its component along its row, out[s] -= <out[s], dot_rows[s]>
 * dot_rows[s] (the unit-norm decoder's gradient projection, in row_projection.c's arithmetic, while the row is in
 * the thread's buffer instead of in a pass of its own).
 * With squares [n_segments] (else NULL), squares[s] = <out[s], out[s]> as stored (square_sum.h's float32 arithmetic,
 * widened to double): the gradient norm clipping needs, without a pass over the gradient of its own.
 *
 * row_squares: out[r] = <rows[r], rows[r]> in the same arithmetic, for n_rows rows of width values (the clipping
 * norm of a gradient no sweep formed: both give the same doubles for the same floats).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "square_sum.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { ALIGNMENT = 64, SEGMENTS_PER_CHUNK = 256 };

static void store_row(float *out, const float *row, int64_t width, int64_t stream) {
    int64_t c = 0;
#ifdef __AVX512F__
    if (stream && ((uintptr_t)out % ALIGNMENT) == 0) {
        for (; c + 16 <= width; c += 16) _mm512_stream_ps(out + c, row ? _mm512_load_ps(row + c) : _mm512_setzero_ps());
    }
#endif
    if (row) {
        memcpy(out + c, row + c, (width - c) * sizeof(float));
    } else {
        memset(out + c, 0, (width - c) * sizeof(float));
    }
}

/* Entry p's dot product with the segment's dot row: LANES partial sums (column c to lane c % LANES) with fmaf, summed
 * in lane order at the end, as row_projection.c sums. */
enum { LANES = 16 };

static float lanes_total(const float *lanes) {
    float total = 0.0f;
    for (int l = 0; l < LANES; ++l) total += lanes[l];
    return total;
}

static float dot_lanes(const float *t, const float *w, int64_t width) {
    float lanes[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= width; c += LANES)
        for (int l = 0; l < LANES; ++l) lanes[l] = fmaf(t[c + l], w[c + l], lanes[l]);
    for (int l = 0; c + l < width; ++l) lanes[l] = fmaf(t[c + l], w[c + l], lanes[l]);
    return lanes_total(lanes);
}

/* Columns [c, c + n) of a sweep over four entries' rows t0..t3 (values v0..v3): their products added to acc in entry
 * order, and each row's products with the dot row w into its lanes l0..l3 (column c + l to lane l, n <= LANES). */
static inline void sweep_four(float *acc, const float *t0, const float *t1, const float *t2, const float *t3, float v0,
                              float v1, float v2, float v3, const float *w, int64_t c, int n, float *l0, float *l1,
                              float *l2, float *l3) {
    for (int l = 0; l < n; ++l) {
        acc[c + l] = (((acc[c + l] + v0 * t0[c + l]) + v1 * t1[c + l]) + v2 * t2[c + l]) + v3 * t3[c + l];
        l0[l] = fmaf(t0[c + l], w[c + l], l0[l]);
        l1[l] = fmaf(t1[c + l], w[c + l], l1[l]);
        l2[l] = fmaf(t2[c + l], w[c + l], l2[l]);
        l3[l] = fmaf(t3[c + l], w[c + l], l3[l]);
    }
}

/* Where entry p's value (and dot product) sits: order[p], or p itself without an order. */
static inline int64_t at(const int64_t *order, int64_t p) { return order ? order[p] : p; }

static void sum_segment(float *acc, const int64_t *index, const int64_t *order, const float *values,
                        const float *table, int64_t start, int64_t end, int64_t width, const float *dot_row,
                        float *dots) {
    const float *t = table + index[start] * width;
    float v = values[at(order, start)];
    for (int64_t c = 0; c < width; ++c) acc[c] = v * t[c];
    if (dots) dots[at(order, start)] = dot_lanes(t, dot_row, width);
    int64_t p = start + 1;
    for (; p + 4 <= end; p += 4) {
        const float *t0 = table + index[p] * width, *t1 = table + index[p + 1] * width;
        const float *t2 = table + index[p + 2] * width, *t3 = table + index[p + 3] * width;
        float v0 = values[at(order, p)], v1 = values[at(order, p + 1)];
        float v2 = values[at(order, p + 2)], v3 = values[at(order, p + 3)];
        if (!dots) {
            for (int64_t c = 0; c < width; ++c)
                acc[c] = (((acc[c] + v0 * t0[c]) + v1 * t1[c]) + v2 * t2[c]) + v3 * t3[c];
            continue;
        }
        float l0[LANES] = {0}, l1[LANES] = {0}, l2[LANES] = {0}, l3[LANES] = {0};
        int64_t c = 0;
        for (; c + LANES <= width; c += LANES)
            sweep_four(acc, t0, t1, t2, t3, v0, v1, v2, v3, dot_row, c, LANES, l0, l1, l2, l3);
        sweep_four(acc, t0, t1, t2, t3, v0, v1, v2, v3, dot_row, c, (int)(width - c), l0, l1, l2, l3);
        dots[at(order, p)] = lanes_total(l0);
        dots[at(order, p + 1)] = lanes_total(l1);
        dots[at(order, p + 2)] = lanes_total(l2);
        dots[at(order, p + 3)] = lanes_total(l3);
    }
    for (; p < end; ++p) {
        t = table + index[p] * width;
        v = values[at(order, p)];
        for (int64_t c = 0; c < width; ++c) acc[c] = acc[c] + v * t[c];
        if (dots) dots[at(order, p)] = dot_lanes(t, dot_row, width);
    }
}

/* The segment's sum without its component along its row: acc -= <acc, row> row, as row_projection.c computes it. */
static void project_off(float *acc, const float *row, int64_t width) {
    float dot = dot_lanes(acc, row, width);
    for (int64_t c = 0; c < width; ++c) acc[c] = fmaf(-dot, row[c], acc[c]);
}

int64_t segment_sums(const int64_t *offsets, const int64_t *index, const int64_t *order, const float *values,
                     const float *table, int64_t n_segments, int64_t width, float *out, const float *dot_rows,
                     float *dots, int64_t project, int64_t stream, double *squares, int64_t n_threads) {
    if (n_threads < 1) n_threads = 1;
    size_t bytes = ((size_t)width * sizeof(float) + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *acc = aligned_alloc(ALIGNMENT, bytes > 0 ? bytes : ALIGNMENT);
#pragma omp atomic
        failed += acc == NULL;
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, SEGMENTS_PER_CHUNK)
            for (int64_t j = 0; j < n_segments; ++j) {
                int64_t start = offsets[j], end = offsets[j + 1];
                const float *dot_row = dot_rows ? dot_rows + j * width : NULL;
                if (start < end) {
                    sum_segment(acc, index, order, values, table, start, end, width, dot_row, dots);
                    if (project) project_off(acc, dot_row, width);
                }
                if (squares) squares[j] = start < end ? (double)square_sum(acc, width) : 0.0;
                store_row(out + j * width, start < end ? acc : NULL, width, stream);
            }
        }
        free(acc);
#ifdef __AVX512F__
        _mm_sfence(); /* this thread's non-temporal stores are visible before the caller reads */
#endif
    }
    return failed ? -1 : 0;
}

void row_squares(const float *rows, int64_t n_rows, int64_t width, double *out, int64_t n_threads) {
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) out[r] = (double)square_sum(rows + r * width, width);
}
