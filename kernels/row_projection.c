/* Each gradient row without its component along its weight row, in place, on the CPU, float32 (docs/methods.md §1.8).
 *
 * crosscoder.kernels.row_projection compiles this file (native.py) and calls project_out_rows() through ctypes; its
 * plain-PyTorch reference there defines the result (to rounding: the dot products sum in another order), and the
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
