/* The sum of equally shaped float32 matrices with each summed row's squares, on the CPU (docs/methods.md §3.6): the
 * sharded optimizer's reduce-scatter (each process summing its chunk of the processes' gradients) and the clipping
 * norm's squares of that sum in one pass over it instead of two.
 *
 * crosscoder.kernels.row_sums compiles this file (native.py) and calls sum_rows() through ctypes; its plain-PyTorch
 * reference there (torch.add, then add_ for each further term, then row_squared_norms) gives the same floats and the
 * same doubles, and the tests compare them.
 *
 * sum_rows: out[r, :] = ((terms[0][r, :] + terms[1][r, :]) + terms[2][r, :]) + ... (one float add at a time, in term
 * order: torch's arithmetic), and with squares (else NULL) squares[r] = <out[r], out[r]> as stored (square_sum.h's
 * float32 arithmetic, widened to double: row_squares' doubles for the same floats), while the row is in cache. Rows
 * are dealt to OpenMP threads (torch's runtime, already loaded). Plain loops the compiler vectorises: every build
 * computes the same values.
 */
#include <stdint.h>

#include "square_sum.h"

void sum_rows(const float *const *terms, int64_t n_terms, float *out, int64_t n_rows, int64_t width, double *squares,
              int64_t n_threads) {
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
        float *o = out + r * width;
        const float *first = terms[0] + r * width, *second = terms[1] + r * width;
        for (int64_t c = 0; c < width; ++c) o[c] = first[c] + second[c];
        for (int64_t t = 2; t < n_terms; ++t) {
            const float *term = terms[t] + r * width;
            for (int64_t c = 0; c < width; ++c) o[c] += term[c];
        }
        if (squares) squares[r] = (double)square_sum(o, width);
    }
}
