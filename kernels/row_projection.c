/* The unit-norm decoder's two row operations on the CPU, float32, in place (docs/methods.md §1.8): each gradient row
 * without its component along its weight row (project_out_rows), and each weight row scaled to unit norm
 * (normalise_rows).
 *
 * crosscoder.kernels.row_projection compiles this file (native.py) and calls its functions through ctypes; their
 * plain-PyTorch references there define the results (to rounding: the dot products sum in another order), and the
 * tests compare the two.
 *
 * project_out_rows: grad[j, :] -= <grad[j, :], rows[j, :]> * rows[j, :] for every row j, one row at a time (its
 * dot product and update while it is in cache), rows split between OpenMP threads (torch's runtime, already
 * loaded). The dot product: LANES partial sums (column c goes to lane c % LANES) with fmaf, then summed in lane
 * order; the update: grad = fmaf(-dot, rows, grad). Plain loops the compiler vectorises: every build computes the
 * same values.
 */
#include <math.h>
#include <stdint.h>

#include "square_sum.h"

enum { LANES = 16 };

void project_out_rows(const float *rows, float *grad, int64_t n_rows, int64_t width, int64_t n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t j = 0; j < n_rows; ++j) {
        const float *w = rows + j * width;
        float *g = grad + j * width;
        float lanes[LANES] = {0};
        int64_t c = 0;
        for (; c + LANES <= width; c += LANES)
            for (int l = 0; l < LANES; ++l) lanes[l] = fmaf(g[c + l], w[c + l], lanes[l]);
        for (int l = 0; c + l < width; ++l) lanes[l] = fmaf(g[c + l], w[c + l], lanes[l]);
        float dot = 0.0f;
        for (int l = 0; l < LANES; ++l) dot += lanes[l];
        for (c = 0; c < width; ++c) g[c] = fmaf(-dot, w[c], g[c]);
    }
}

/* normalise_rows: rows[j, :] *= 1 / max(||rows[j, :]||, min_norm) for every row j, in place, one visit per row (its
 * squares summed, then its scaling while it is in cache); the norm: sqrtf of square_sum.h's float sum of squares. A
 * multiply by the reciprocal, not a division per value: at 73,728 rows of 2,304 on the development machine 28 ms
 * against 42-45 ms dividing (and 48-60 ms for torch's norm then div_); the rows' norms are 1 to float32 rounding
 * either way. */
void normalise_rows(float *rows, int64_t n_rows, int64_t width, float min_norm, int64_t n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t j = 0; j < n_rows; ++j) {
        float *w = rows + j * width;
        float scale = 1.0f / fmaxf(sqrtf(square_sum(w, width)), min_norm);
        for (int64_t c = 0; c < width; ++c) w[c] = w[c] * scale;
    }
}
