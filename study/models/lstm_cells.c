/* The pointwise part of one LSTM step, forward and masked backward, for study.models.cpu_cells.
 *
 * At the pixel-MNIST shape (784 steps, B=100, H=100) a step's pointwise work done as a dozen
 * separate torch ops costs more than its GEMM: each op is a pass over a (B, 4H) block plus a
 * dispatch. Here it is one pass. The GEMMs stay in torch (MKL/oneDNN).
 *
 * Layouts, all row-major and contiguous: gates/act/dgates (B, 4H) in nn.LSTM's order i|f|g|o;
 * c and h blocks (B, H). Every element is computed on its own, in a fixed order (built with
 * -ffp-contract=off), so a result does not depend on where the element sits in a SIMD register:
 * a packed member gets the bits of its solo run.
 */
#include <math.h>
#include <stdint.h>

/* exp for float32 in a form GCC vectorises: Cephes' expf (range reduction by ln 2, degree-6
 * polynomial, about 1 ulp). libm's expf vectorises only under -ffast-math. */
static inline float exp_f32(float x) {
    /* Comparisons, not fminf/fmaxf, so a NaN stays NaN and a diverged trial is still seen. */
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365478515625f ? -87.3365478515625f : x;
    /* Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick (exact without fast-math). */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t bits; float value; } scale; /* 2^n: n is in [-126, 127] after the clamps */
    scale.bits = ((int32_t)n + 127) << 23;
    return p * scale.value;
}

static inline float sigmoid_f32(float z) { return 1.0f / (1.0f + exp_f32(-z)); }
/* tanh(z) = 2 sigmoid(2z) - 1: one exp, and the loop stays vectorised. */
static inline float tanh_f32(float z) { return 2.0f * sigmoid_f32(2.0f * z) - 1.0f; }
/* float64 (the exact-gradient tests) uses libm: accuracy over speed. */
static inline double sigmoid_f64(double z) { return 1.0 / (1.0 + exp(-z)); }
static inline double tanh_f64(double z) { return tanh(z); }

/* forward of one batch row: the gate pre-activations zi|zf|zg|zo (x W_ih^T + b + h_{t-1} W_hh^T)
 * become the activated i, f, g, o (saved for the backward); writes c_t, tanh(c_t) and h_t.
 * Separate restrict pointers per stream let GCC vectorise the loop. */
#define DEFINE_FORWARD(REAL, SUFFIX)                                                          \
    static inline void forward_row_##SUFFIX(                                                   \
        REAL *restrict zi, REAL *restrict zf, REAL *restrict zg, REAL *restrict zo,            \
        const REAL *restrict cp, REAL *restrict cn, REAL *restrict tc, REAL *restrict hn,      \
        int64_t hidden) {                                                                      \
        for (int64_t j = 0; j < hidden; j++) {                                                 \
            REAL i = sigmoid_##SUFFIX(zi[j]), f = sigmoid_##SUFFIX(zf[j]);                     \
            REAL g = tanh_##SUFFIX(zg[j]), o = sigmoid_##SUFFIX(zo[j]);                        \
            REAL c = f * cp[j] + i * g;                                                        \
            REAL t = tanh_##SUFFIX(c);                                                         \
            zi[j] = i;                                                                         \
            zf[j] = f;                                                                         \
            zg[j] = g;                                                                         \
            zo[j] = o;                                                                         \
            cn[j] = c;                                                                         \
            tc[j] = t;                                                                         \
            hn[j] = o * t;                                                                     \
        }                                                                                      \
    }                                                                                          \
    void lstm_forward_##SUFFIX(REAL *gates, const REAL *c_prev, REAL *c_next, REAL *tanh_c,   \
                               REAL *h_next, int64_t batch, int64_t hidden) {                  \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            REAL *z = gates + b * 4 * hidden;                                                  \
            int64_t row = b * hidden;                                                          \
            forward_row_##SUFFIX(z, z + hidden, z + 2 * hidden, z + 3 * hidden, c_prev + row,  \
                                 c_next + row, tanh_c + row, h_next + row, hidden);            \
        }                                                                                      \
    }

/* backward of one batch row at step t: from the gradients reaching h_t (dh from step t+1 plus
 * grad_out, the loss's own gradient at t) and c_t (dc), writes d loss / d gate pre-activations
 * (di|df|dg|do) and d loss / d c_{t-1} through c_{t-1} -> c_t (dc_out, which may alias dc: each
 * element is read before it is written). Absent gradients come as a block of zeros: x + 0 == x,
 * so the sums are unchanged bit for bit. The h-detach and c-detach cuts are the caller's: it
 * skips the GEMM into h_{t-1}, or drops dc_out (Algorithm 1 of the paper). */
#define DEFINE_BACKWARD(REAL, SUFFIX)                                                         \
    static inline void backward_row_##SUFFIX(                                                  \
        const REAL *restrict ai, const REAL *restrict af, const REAL *restrict ag,             \
        const REAL *restrict ao, const REAL *restrict cp, const REAL *restrict tc,             \
        const REAL *restrict dh, const REAL *restrict go, const REAL *dc, REAL *restrict di,  \
        REAL *restrict df, REAL *restrict dg, REAL *restrict dout, REAL *dc_out,               \
        int64_t hidden) {                                                                      \
        for (int64_t j = 0; j < hidden; j++) {                                                 \
            REAL i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tc[j];                        \
            REAL dh_t = dh[j] + go[j];                                                         \
            REAL dc_t = dc[j] + dh_t * (o * (1 - t * t));                                      \
            di[j] = dc_t * g * (i * (1 - i));                                                  \
            df[j] = dc_t * cp[j] * (f * (1 - f));                                              \
            dg[j] = dc_t * i * (1 - g * g);                                                    \
            dout[j] = dh_t * t * (o * (1 - o));                                                \
            dc_out[j] = dc_t * f;                                                              \
        }                                                                                      \
    }                                                                                          \
    void lstm_backward_##SUFFIX(const REAL *act, const REAL *c_prev, const REAL *tanh_c,      \
                                const REAL *dh, const REAL *grad_out, const REAL *dc,          \
                                REAL *dgates, REAL *dc_out, int64_t batch, int64_t hidden) {   \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            const REAL *a = act + b * 4 * hidden;                                              \
            REAL *d = dgates + b * 4 * hidden;                                                 \
            int64_t row = b * hidden;                                                          \
            backward_row_##SUFFIX(a, a + hidden, a + 2 * hidden, a + 3 * hidden, c_prev + row, \
                                  tanh_c + row, dh + row, grad_out + row, dc + row, d,         \
                                  d + hidden, d + 2 * hidden, d + 3 * hidden, dc_out + row,    \
                                  hidden);                                                     \
        }                                                                                      \
    }

DEFINE_FORWARD(float, f32)
DEFINE_FORWARD(double, f64)
DEFINE_BACKWARD(float, f32)
DEFINE_BACKWARD(double, f64)
