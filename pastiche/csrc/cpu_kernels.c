/* Fused CPU kernels for LoRA training (pastiche/kernels.py builds and loads this file).
 *
 * Each kernel does in one pass over memory what PyTorch's eager mode does in several, one op
 * (and one fresh tensor) at a time. Tensors arrive as contiguous raw buffers, either bf16
 * (stored as uint16) or fp32, chosen by the `bf16` argument; arithmetic is always fp32, and
 * roundings to bf16 happen where PyTorch's own ops round. Rows are split between threads with
 * OpenMP: loaded after torch, the library shares torch's OpenMP runtime and thread count.
 *
 * Inside each exported function's parallel loop, a row (or a chunk of elements) is handed to an
 * always-inlined body with `bf16` as a constant, so the compiler drops the dtype branches and
 * vectorizes the loops over elements.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_float(bf16 h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline bf16 float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40u); /* NaN stays NaN */
    return (bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* As a tensor of the given dtype would hold it (torch rounds each op's result to its dtype). The
 * rounding stays in 32-bit integers: a trip through uint16 makes the vectorized loop shuffle. */
static inline float round_to(float v, int bf16) {
    if (!bf16) return v;
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&v, &bits, sizeof v);
    return v;
}

#define BODY static inline __attribute__((always_inline))
#define BY_DTYPE(body, ...) (bf16 ? body(__VA_ARGS__, 1) : body(__VA_ARGS__, 0))
#define CHUNK 4096 /* elements per task in element-wise kernels */

/* max over n values: 16 running maxima, so the loop vectorizes without -ffast-math */
static inline float row_max(const void *p, int64_t base, int64_t n, const int bf16) {
    float lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = -__builtin_inff();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) {
            float v = load(p, base + k + l, bf16);
            lanes[l] = v > lanes[l] ? v : lanes[l];
        }
    float top = -__builtin_inff();
    for (; k < n; k++) top = load(p, base + k, bf16) > top ? load(p, base + k, bf16) : top;
    for (int l = 0; l < 16; l++) top = lanes[l] > top ? lanes[l] : top;
    return top;
}

/* exp(x) for x >= -87 (callers zero anything below): x = n ln2 + r with |r| <= ln2 / 2, then
 * 2^n times the Taylor series of exp(r) to degree 7 (truncation error below 1e-8 relative).
 * Plain arithmetic, so the compiler vectorizes the loops that call it. */
static inline float exp_approx(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* ---- dropout: out = x where a 16-bit random number >= dropped, else 0 ---------------------
 * The random numbers are a hash of (seed, element index), so the backward pass regenerates the
 * same mask from the seed instead of keeping it, and the result does not depend on threads.
 * The hash is splitmix64's output function; each 64-bit value gives four 16-bit numbers. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline int kept(uint64_t seed, int64_t i, int32_t dropped) {
    uint64_t bits = mix64(seed + (uint64_t)(i / 4 + 1) * 0x9e3779b97f4a7c15ull);
    return (int32_t)((bits >> (16 * (i % 4))) & 0xffffu) >= dropped;
}

BODY int dropout_body(const void *x, void *out, int64_t start, int64_t end, uint64_t seed, int32_t dropped,
                      const int bf16) {
    for (int64_t i = start; i < end; i++) store(out, i, kept(seed, i, dropped) ? load(x, i, bf16) : 0.0f, bf16);
    return 0;
}

void pst_dropout(const void *x, void *out, int64_t n, uint64_t seed, int32_t dropped, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK)
        BY_DTYPE(dropout_body, x, out, start, start + CHUNK < n ? start + CHUNK : n, seed, dropped);
}

/* ---- RMSNorm as Llama computes it: w * to_dtype(x * rsqrt(mean(x^2) + eps)) ------------- */
BODY float rms_norm_body(const void *x, const void *w, void *out, int64_t base, int64_t d, float eps,
                         const int bf16) {
    float squares = 0.0f;
    for (int64_t j = 0; j < d; j++) squares += load(x, base + j, bf16) * load(x, base + j, bf16);
    float s = 1.0f / __builtin_sqrtf(squares / (float)d + eps);
    for (int64_t j = 0; j < d; j++)
        store(out, base + j, load(w, j, bf16) * round_to(load(x, base + j, bf16) * s, bf16), bf16);
    return s;
}

void pst_rms_norm(const void *x, const void *w, void *out, float *inv, int64_t rows, int64_t d, float eps,
                  int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) inv[r] = BY_DTYPE(rms_norm_body, x, w, out, r * d, d, eps);
}

/* grad_x = inv * (g - x * inv^2 * mean(g * x)) with g = grad * w (the weight gets no gradient). */
BODY int rms_norm_backward_body(const void *grad, const void *x, const void *w, float s, void *grad_x, int64_t base,
                                int64_t d, const int bf16) {
    float dot = 0.0f;
    for (int64_t j = 0; j < d; j++) dot += load(grad, base + j, bf16) * load(w, j, bf16) * load(x, base + j, bf16);
    float c = s * s * dot / (float)d;
    for (int64_t j = 0; j < d; j++)
        store(grad_x, base + j, s * (load(grad, base + j, bf16) * load(w, j, bf16) - load(x, base + j, bf16) * c), bf16);
    return 0;
}

void pst_rms_norm_backward(const void *grad, const void *x, const void *w, const float *inv, void *grad_x,
                           int64_t rows, int64_t d, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) BY_DTYPE(rms_norm_backward_body, grad, x, w, inv[r], grad_x, r * d, d);
}

/* ---- Llama's MLP activation: h = silu(gate) * up, and its gradients ------------------------
 * Unlike eager PyTorch, silu(gate) is not rounded to bf16 before the product: one rounding
 * fewer, and the vectorized loop runs 2-3x faster without it. */
BODY int silu_mul_body(const void *gate, const void *up, void *h, int64_t start, int64_t end, const int bf16) {
    for (int64_t i = start; i < end; i++) {
        float g = load(gate, i, bf16);
        store(h, i, g / (1.0f + exp_approx(-g)) * load(up, i, bf16), bf16);
    }
    return 0;
}

void pst_silu_mul(const void *gate, const void *up, void *h, int64_t n, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK)
        BY_DTYPE(silu_mul_body, gate, up, h, start, start + CHUNK < n ? start + CHUNK : n);
}

BODY int silu_mul_backward_body(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                                int64_t start, int64_t end, const int bf16) {
    for (int64_t i = start; i < end; i++) {
        float g = load(gate, i, bf16), dh = load(grad, i, bf16);
        float sig = 1.0f / (1.0f + exp_approx(-g));
        store(grad_gate, i, dh * load(up, i, bf16) * sig * (1.0f + g * (1.0f - sig)), bf16);
        store(grad_up, i, dh * g * sig, bf16);
    }
    return 0;
}

void pst_silu_mul_backward(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                           int64_t n, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK)
        BY_DTYPE(silu_mul_backward_body, grad, gate, up, grad_gate, grad_up, start, start + CHUNK < n ? start + CHUNK : n);
}

/* ---- rotary position embedding, written in the layout the attention multiplies -------------
 * x: [batch, length, heads, dim] as the projection wrote it; cos, sin: [batch or 1, length, dim]
 * (cos_batch_stride 0 when shared); out: [batch, groups, length, heads / groups, dim] with
 * out = scale * (x cos + rotate(x) sin), rotate(x1, x2) = (-x2, x1) for the halves of dim.
 * inverse = 1 is the backward pass: x is then the gradient in out's layout, out the gradient in
 * x's layout, dx1 = scale * (g1 c1 + g2 s2), dx2 = scale * (g2 c2 - g1 s1). */
BODY int rotary_body(const void *src, const void *cos, const void *sin, void *dst, int64_t from, int64_t to,
                     int64_t trig, int64_t half, float scale, const int inverse, const int bf16) {
    float first[256], second[256]; /* dim <= 512, checked by the caller */
    for (int64_t j = 0; j < half; j++) {
        float c1 = load(cos, trig + j, bf16), c2 = load(cos, trig + half + j, bf16);
        float s1 = load(sin, trig + j, bf16), s2 = load(sin, trig + half + j, bf16);
        float a = load(src, from + j, bf16), b = load(src, from + half + j, bf16);
        first[j] = scale * (inverse ? a * c1 + b * s2 : a * c1 - b * s1);
        second[j] = scale * (inverse ? b * c2 - a * s1 : b * c2 + a * s2);
    }
    for (int64_t j = 0; j < half; j++) store(dst, to + j, first[j], bf16);
    for (int64_t j = 0; j < half; j++) store(dst, to + half + j, second[j], bf16);
    return 0;
}

void pst_rotary(const void *x, const void *cos, const void *sin, void *out, int64_t batch, int64_t length,
                int64_t heads, int64_t groups, int64_t dim, int64_t cos_batch_stride, float scale, int inverse,
                int bf16) {
    const int64_t per = heads / groups;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < batch * length * heads; i++) {
        int64_t b = i / (length * heads), l = (i / heads) % length, h = i % heads;
        int64_t natural = i * dim, grouped = (((b * groups + h / per) * length + l) * per + h % per) * dim;
        int64_t trig = b * cos_batch_stride + l * dim;
        if (inverse)
            BY_DTYPE(rotary_body, x, cos, sin, out, grouped, natural, trig, dim / 2, scale, 1);
        else
            BY_DTYPE(rotary_body, x, cos, sin, out, natural, grouped, trig, dim / 2, scale, 0);
    }
}

/* ---- softmax(scores + mask) over the last axis -----------------------------------------------
 * scores, out: `rows` rows of `keys`; row r belongs to batch r / rows_per_batch and to query
 * (r / per_query) % queries, whose mask row (fp32, 0 or -inf) starts at
 * mask + batch * mask_batch_stride + query * mask_row_stride. Blocked keys get exactly 0; every
 * row must keep one key. Only the keys between a row's first and last open one are computed:
 * under a causal mask that halves the work. */
BODY int masked_softmax_body(const void *scores, const float *m, void *out, float *row, int64_t base, int64_t first,
                             int64_t end, int64_t keys, const int bf16) {
    for (int64_t k = first; k < end; k++) row[k] = load(scores, base + k, bf16) + m[k];
    float top = row_max(row, first, end - first, 0), total = 0.0f;
    for (int64_t k = first; k < end; k++) {
        float z = row[k] - top;
        row[k] = exp_approx(z) * (float)(z >= -87.0f);
        total += row[k];
    }
    float scale = 1.0f / total;
    for (int64_t k = 0; k < first; k++) store(out, base + k, 0.0f, bf16);
    for (int64_t k = first; k < end; k++) store(out, base + k, row[k] * scale, bf16);
    for (int64_t k = end; k < keys; k++) store(out, base + k, 0.0f, bf16);
    return 0;
}

void pst_masked_softmax(const void *scores, const float *mask, void *out, int64_t rows, int64_t keys, int64_t queries,
                        int64_t per_query, int64_t rows_per_batch, int64_t mask_batch_stride, int64_t mask_row_stride,
                        int bf16) {
#pragma omp parallel
    {
        float *row = malloc((size_t)keys * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t b = r / rows_per_batch, q = (r / per_query) % queries, first = 0, end = keys;
            const float *m = mask + b * mask_batch_stride + q * mask_row_stride;
            while (first < keys - 1 && m[first] == -__builtin_inff()) first++;
            while (end > first + 1 && m[end - 1] == -__builtin_inff()) end--;
            BY_DTYPE(masked_softmax_body, scores, m, out, row, r * keys, first, end, keys);
        }
        free(row);
    }
}

/* ---- cross-entropy of logit rows, and its gradient in place ----------------------------------
 * logits [rows, vocab] become softmax - one_hot(target); returns the sum over rows of
 * logsumexp(row) - row[target]. */
BODY float cross_entropy_body(void *logits, int64_t target, int64_t base, int64_t vocab, const int bf16) {
    float top = row_max(logits, base, vocab, bf16), total = 0.0f;
    for (int64_t k = 0; k < vocab; k++) {
        float z = load(logits, base + k, bf16) - top;
        total += exp_approx(z) * (float)(z >= -87.0f);
    }
    float scale = 1.0f / total, loss = top + __builtin_logf(total) - load(logits, base + target, bf16);
    for (int64_t k = 0; k < vocab; k++) {
        float z = load(logits, base + k, bf16) - top;
        store(logits, base + k, exp_approx(z) * (float)(z >= -87.0f) * scale, bf16);
    }
    store(logits, base + target, load(logits, base + target, bf16) - 1.0f, bf16);
    return loss;
}

double pst_cross_entropy_grad(void *logits, const int64_t *targets, int64_t rows, int64_t vocab, int bf16) {
    double loss = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : loss)
    for (int64_t r = 0; r < rows; r++) loss += BY_DTYPE(cross_entropy_body, logits, targets[r], r * vocab, vocab);
    return loss;
}
