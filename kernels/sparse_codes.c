/* The latent-sorted view of SparseCodes by a counting sort (CPU; docs/methods.md §4.4).
 *
 * crosscoder.kernels.sparse_codes compiles this file (native.py) and calls latent_view() through ctypes; its
 * plain-PyTorch reference there (a stable sort) defines the result, and the tests compare the two.
 *
 * latent_view: for nnz entries with latents[e] in [0, dict_size) and rows[e], writes order[nnz] (the entry indices
 * sorted by latent, stably: entries of one latent keep their order), offsets[dict_size + 1] (latent j's entries are
 * order[offsets[j]:offsets[j + 1]]) and rows_by_latent[nnz] = rows[order]. Returns 0, or -1 (nothing written but
 * offsets) when a latent is out of range.
 */
#include <stdint.h>
#include <string.h>

int64_t latent_view(const int64_t *latents, const int64_t *rows, int64_t nnz, int64_t dict_size, int64_t *order,
                    int64_t *offsets, int64_t *rows_by_latent) {
    memset(offsets, 0, (size_t)(dict_size + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < nnz; ++e) {
        int64_t latent = latents[e];
        if (latent < 0 || latent >= dict_size) return -1;
        offsets[latent + 1] += 1;
    }
    for (int64_t j = 0; j < dict_size; ++j) offsets[j + 1] += offsets[j];
    /* offsets[j] is where latent j's next entry goes while placing; shifted back afterwards */
    for (int64_t e = 0; e < nnz; ++e) {
        int64_t destination = offsets[latents[e]]++;
        order[destination] = e;
        rows_by_latent[destination] = rows[e];
    }
    memmove(offsets + 1, offsets, (size_t)dict_size * sizeof(int64_t));
    offsets[0] = 0;
    return 0;
}
