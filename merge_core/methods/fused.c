/* The task-arithmetic family's per-element work in one pass (see fused.py, which compiles and calls this), and
   the two passes of linear and SLERP (weighted_sum, dots) at the end of this file.

   out[i] = base[i] + mix_i, from n task vectors ("terms"), each trimmed (kept) then weighted:
     kept_j = d_j where low_j < |d_j| <= high_j                    (a magnitude window: TIES, breadcrumbs)
              and, for a random trim, where u_j(i) < keep prob       (DARE: a constant; DELLA: a + b * rank_j[i])
     u_j    = coeff_j * kept_j
   without consensus: mix = sum_j u_j   (coeffs already carry lambda / sum of weights)
   with consensus (TIES sign election, as mergekit): s = sum_j u_j >= 0 ? +1 : -1; u_j agrees when sign(u_j) = s;
     mix = lambda * (sum of agreeing u_j) / (normalize ? sum of agreeing weight_j, 1 when 0 : 1)
   NaN in a task vector propagates (as torch's hardshrink keeps it); accumulation is float32 in term order.
   Tensors are float32 or bfloat16 (`bf16` flags): bfloat16 values are widened to float32 on load, and the output
   is rounded to the nearest bfloat16 (ties to even, as torch) once, at the end.

   u_j(i) is a 16-bit uniform: quarter i % 4 (from the low bits) of SplitMix64's output for state
   key_j + (i / 4 + 1) * golden. A counter-based stream, so any span draws its numbers on its own (no mask is
   stored; the L1 pass and the combine pass draw the same ones); one 64-bit hash serves four elements. */

#include <math.h>
#include <stdint.h>

typedef struct {
    const void *delta;       /* task vector j at the segment's first element (float32, or bfloat16 if bf16) */
    const void *rank;        /* DELLA: rank of |d| in its row at the segment's first element: a uint16 position r
                                (the rank is r / span, correctly rounded as torch divides), or float32 if span = 0 */
    uint64_t key;            /* random trims: the stream's key */
    float low, high;         /* the window (low < 0: no lower bound; high = inf: no upper bound) */
    float coeff, weight;     /* u = coeff * kept; weight: its term of the divisor */
    float span;              /* DELLA: row width - 1 (0: float32 ranks) */
    float prob_a, prob_b;    /* random trims: keep probability a (DARE) or a + b * rank (DELLA) */
    int32_t random;          /* 0: window only; 1: DARE; 2: DELLA */
    int32_t bf16;            /* the task vector is bfloat16 */
    uint32_t threshold;      /* DARE: kept where u < threshold (= ceil(p * 65536)) */
    int32_t pad;
} Term;

#define BLOCK 512       /* elements per block of the L1 pass (kept_abs_sum) */
#define STEP 128        /* of the merge pass: its six accumulators stay in L1 (512 took 2-3x as long) */
#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t draw(uint64_t key, int64_t i) {
    uint64_t z = key + (uint64_t)(i + 1) * GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline float widen(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline uint16_t narrow(float f) {        /* to bfloat16, round to nearest even (NaN stays NaN) */
    union { float f; uint32_t u; } v = {.f = f};
    if (isnan(f)) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? widen(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* u for the m elements from global position at0 (the 16-bit quarters of the hashes, little-endian) */
static void uniforms(uint64_t key, int64_t at0, int64_t m, uint16_t *u) {
    uint64_t hashes[BLOCK / 4 + 2];
    int64_t first = at0 >> 2, skip = at0 & 3, groups = (skip + m + 3) >> 2;
    for (int64_t g = 0; g < groups; g++) hashes[g] = draw(key, first + g);
    const uint16_t *quarters = (const uint16_t *)hashes + skip;
    for (int64_t i = 0; i < m; i++) u[i] = quarters[i];
}

/* kept_j for m elements from the segment's element i0 (global position at0) into k */
static void kept_block(const Term *t, int64_t i0, int64_t at0, int64_t m, float *k) {
    float low = t->low, high = t->high;
    for (int64_t i = 0; i < m; i++) {
        float x = load(t->delta, i0 + i, t->bf16), a = fabsf(x);
        k[i] = (a <= low || a > high) ? 0.0f : x;        /* NaN compares false: kept */
    }
    if (t->random) {
        uint16_t u[BLOCK];
        uniforms(t->key, at0, m, u);
        if (t->random == 1) {
            uint32_t threshold = t->threshold;
            for (int64_t i = 0; i < m; i++) k[i] = u[i] < threshold ? k[i] : 0.0f;
        } else {
            float r[BLOCK];
            if (t->span > 0.0f) {
                const uint16_t *code = (const uint16_t *)t->rank + i0;
                for (int64_t i = 0; i < m; i++) r[i] = (float)code[i] / t->span;
            } else {
                const float *value = (const float *)t->rank + i0;
                for (int64_t i = 0; i < m; i++) r[i] = value[i];
            }
            for (int64_t i = 0; i < m; i++)
                k[i] = (float)u[i] * 0x1p-16f < t->prob_a + t->prob_b * r[i] ? k[i] : 0.0f;
        }
    }
}

/* sum |kept_j| over n elements (the L1 rescale's "after"): float32 in 16 lanes per block (one serial chain of
   additions would be 20x slower than the rest of the pass), float64 across blocks */
double kept_abs_sum(int64_t n, const Term *t, int64_t offset) {
    float k[BLOCK];
    double sum = 0.0;
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t m = n - b < BLOCK ? n - b : BLOCK, i = 0;
        kept_block(t, b, offset + b, m, k);
        float lane[16] = {0.0f}, part = 0.0f;
        for (; i + 16 <= m; i += 16)
            for (int j = 0; j < 16; j++) lane[j] += fabsf(k[i + j]);
        for (; i < m; i++) lane[0] += fabsf(k[i]);
        for (int j = 0; j < 16; j++) part += lane[j];
        sum += part;
    }
    return sum;
}

void combine(int64_t n, const void *base, void *out, int32_t bf16, int32_t terms, const Term *t,
             int32_t consensus, int32_t normalize, float lam, int64_t offset) {
    float k[STEP], total[STEP], pos[STEP], neg[STEP], wpos[STEP], wneg[STEP];
    for (int64_t b = 0; b < n; b += STEP) {
        int64_t m = n - b < STEP ? n - b : STEP;
        for (int64_t i = 0; i < m; i++) total[i] = pos[i] = neg[i] = wpos[i] = wneg[i] = 0.0f;
        for (int32_t j = 0; j < terms; j++) {
            float c = t[j].coeff, w = t[j].weight;
            kept_block(&t[j], b, offset + b, m, k);
            if (!consensus) {
                for (int64_t i = 0; i < m; i++) total[i] += c * k[i];
                continue;
            }
            for (int64_t i = 0; i < m; i++) {
                float u = c * k[i];
                total[i] += u;
                pos[i] += u > 0.0f ? u : 0.0f;
                neg[i] += u < 0.0f ? u : 0.0f;
                wpos[i] += u > 0.0f ? w : 0.0f;
                wneg[i] += u < 0.0f ? w : 0.0f;
            }
        }
        for (int64_t i = 0; i < m; i++) {
            float mix = total[i];
            if (consensus && !isnan(mix)) {            /* NaN: left in, so that it reaches the output */
                int up = mix >= 0.0f;
                mix = up ? pos[i] : neg[i];
                if (normalize) {
                    float den = up ? wpos[i] : wneg[i];
                    mix /= den == 0.0f ? 1.0f : den;
                }
                mix *= lam;
            }
            float merged = load(base, b + i, bf16) + mix;
            if (bf16) ((uint16_t *)out)[b + i] = narrow(merged);
            else ((float *)out)[b + i] = merged;
        }
    }
}

/* out = (sum_j w_j * x_j) / divisor over k inputs of n elements: float32, accumulated in input order, with fused
   multiply-adds if fma (one rounding per input: what torch's SIMD kernels do for addcmul_ in mergekit's linear
   merge; its kernels without SIMD round twice, so the caller mirrors torch), rounded once to bfloat16 at the end if
   bf16 (linear: the weights and their sum; SLERP: c0 * base + c1 * other, divisor 1, which leaves the sum as is) */
void weighted_sum(int64_t n, int32_t k, const void *const *xs, const float *w, float divisor, int32_t bf16,
                  int32_t fma, void *out) {
    float acc[STEP];
    for (int64_t b = 0; b < n; b += STEP) {
        int64_t m = n - b < STEP ? n - b : STEP;
        for (int64_t i = 0; i < m; i++) acc[i] = w[0] * load(xs[0], b + i, bf16);
        for (int32_t j = 1; j < k; j++) {
            float c = w[j];
            if (fma)
                for (int64_t i = 0; i < m; i++) acc[i] = fmaf(c, load(xs[j], b + i, bf16), acc[i]);
            else
                for (int64_t i = 0; i < m; i++) acc[i] += c * load(xs[j], b + i, bf16);
        }
        for (int64_t i = 0; i < m; i++) {
            float v = acc[i] / divisor;
            if (bf16) ((uint16_t *)out)[b + i] = narrow(v);
            else ((float *)out)[b + i] = v;
        }
    }
}

/* result = (sum x*x, sum y*y, sum x*y) in float64 (a product of two floats is exact in float64), eight lanes
   each in a fixed order: the same sums on every CPU (SLERP's angle) */
void dots(int64_t n, const void *x, const void *y, int32_t bf16, double *result) {
    double xx[8] = {0}, yy[8] = {0}, xy[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            double a = load(x, i + j, bf16), b = load(y, i + j, bf16);
            xx[j] += a * a;
            yy[j] += b * b;
            xy[j] += a * b;
        }
    for (; i < n; i++) {
        double a = load(x, i, bf16), b = load(y, i, bf16);
        xx[0] += a * a;
        yy[0] += b * b;
        xy[0] += a * b;
    }
    result[0] = result[1] = result[2] = 0.0;
    for (int j = 0; j < 8; j++) {
        result[0] += xx[j];
        result[1] += yy[j];
        result[2] += xy[j];
    }
}
