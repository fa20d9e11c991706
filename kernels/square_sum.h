/* A float32 row's sum of squares, shared by the C kernels that need one (included, not compiled on its own; native.py's
 * digest covers this file too): SQUARE_LANES partial sums (column c to lane c % SQUARE_LANES) with fmaf — four
 * independent vectors of a pass bound by memory, not one accumulator's latency — then halved: lane l gets lane
 * l + half added, for half = 32, 16, ..., 1 (a fixed order; a vector add per step, not 64 dependent ones). Every
 * build computes the same float. */
#ifndef CROSSCODER_SQUARE_SUM_H
#define CROSSCODER_SQUARE_SUM_H

#include <math.h>
#include <stdint.h>

enum { SQUARE_LANES = 64 };

static inline float square_sum(const float *t, int64_t width) {
    float lanes[SQUARE_LANES] = {0};
    int64_t c = 0;
    for (; c + SQUARE_LANES <= width; c += SQUARE_LANES)
        for (int l = 0; l < SQUARE_LANES; ++l) lanes[l] = fmaf(t[c + l], t[c + l], lanes[l]);
    for (int l = 0; c + l < width; ++l) lanes[l] = fmaf(t[c + l], t[c + l], lanes[l]);
    for (int half = SQUARE_LANES / 2; half > 0; half /= 2)
        for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
    return lanes[0];
}

#endif
