/* Helpers shared by every fused CPU kernel of the package (Note [fused CPU] in
 * optimizer/_fused_cpu.py). This file and fused_loop.c are pasted, with a few #defines,
 * into one translation unit per algorithm: print it with
 *     python -m optimizer kernel-source adamw
 * Compiled with -ffp-contract=off: every operation rounds as the reference's torch ops
 * do; a fused multiply-add only where torch's vectorised CPU kernels use one (lerp). */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
#define FMA(a, b, c) _Generic((a), float: fmaf, default: fma)(a, b, c)
#else
#define FMA(a, b, c) ((a) * (b) + (c)) /* no fast fma here: a call per element would be slow */
#endif
/* torch's lerp: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start) */
#define LERP(a, b, w) ((w) < 0.5 ? FMA((w), (b) - (a), (a)) : FMA((w) - 1, (b) - (a), (b)))
#define SIGN(x) ((T)(((x) > 0) - ((x) < 0))) /* torch.sign: 0 at 0 and at nan */
#define SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* storage types: load into the compute type T, store back rounded to nearest even */
static inline float load_float(float x) { return x; }
static inline float store_float(float x) { return x; }
static inline double load_double(double x) { return x; }
static inline double store_double(double x) { return x; }

typedef uint16_t bf16; /* the upper half of a float32 */
static inline float load_bf16(bf16 x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}
static inline bf16 store_bf16(float x) { /* round to nearest even; nan stays nan */
    union { uint32_t u; float f; } v;
    v.f = x;
    return x != x ? (bf16)0x7fc0 : (bf16)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

#ifdef __FLT16_MAX__
#define HAVE_F16 1
typedef _Float16 f16;
static inline float load_f16(f16 x) { return (float)x; }
static inline f16 store_f16(float x) { return (f16)x; }
#endif

/* the tensor holding block b: first[t] <= b < first[t + 1], first[] the running block counts */
static inline int64_t tensor_of(int64_t b, const int64_t *first, int64_t n_tensors) {
    int64_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* step counters (Note [step counters] in optimizer/_dispatch.py): one-element CPU tensors,
   each moved by one in a single call however many there are */
void count_steps_float(int64_t n, float *const *steps) {
    for (int64_t i = 0; i < n; i++) *steps[i] += 1.0f;
}
void count_steps_double(int64_t n, double *const *steps) {
    for (int64_t i = 0; i < n; i++) *steps[i] += 1.0;
}
