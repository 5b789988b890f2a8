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
/* torch's lerp: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start); the
   choice made on the operands, as torch's vectorised kernel does, so that a loop has no branch */
#define LERP(a, b, w) FMA((w) < 0.5 ? (w) : (w) - 1, (b) - (a), (w) < 0.5 ? (a) : (b))
#define SIGN(x) ((T)(((x) > 0) - ((x) < 0))) /* torch.sign: 0 at 0 and at nan */
/* x / d rounded to nearest, given inv = 1 / d (rounded to nearest, a loop invariant): with a
   fast fma, Markstein's correction of x inv (q within an ulp of x / d, r = x - q d exact, and
   RN(q + r inv) = RN(x / d); Markstein 1990, Theorem 8.10 in Muller et al., Handbook of
   Floating-Point Arithmetic) instead of a division, which costs 5 to 10 times an fma. Exact where
   d, 1 / d and x / d are normal, x / d infinite (q then is), or x is 0 or nan; callers keep to that. */
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
static inline float quotient(float x, float d, float inv) {
    const float q = x * inv;
    const float exact = fmaf(fmaf(-q, d, x), inv, q);
    return fabsf(q) == INFINITY ? q : exact;
}
#else
static inline float quotient(float x, float d, float inv) {
    (void)inv;
    return x / d;
}
#endif
#define QUOTIENT(x, d) quotient((x), (d), 1 / (d)) /* float only: d a loop invariant, 1 / d hoisted */
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

/* Stochastic rounding (Note [stochastic rounding] in optimizer/_rounding.py): 16 random bits per
   element, mix32(index ^ seed) >> 16, the index being the element's offset in the tensor's
   memory (its logical index for a contiguous tensor); the magnitude rounds up iff the bits are
   below frac * 65536, frac the distance to the value toward zero in units of the gap. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x1B873593u;
    return x ^ (x >> 16);
}
static inline uint32_t random16(int64_t index, uint32_t seed) { return mix32((uint32_t)index ^ seed) >> 16; }

static inline uint32_t float_bits(float x) {
    union { uint32_t u; float f; } v;
    v.f = x;
    return v.u;
}
static inline float bits_float(uint32_t x) {
    union { uint32_t u; float f; } v;
    v.u = x;
    return v.f;
}

/* bf16 is a float32's upper half: the value toward zero is the truncation, frac * 65536 the
   lower half. Where the value above is inf (the truncation is the largest finite bf16, or x is
   inf or nan) round to nearest. */
static inline bf16 store_sr_bf16(float x, uint32_t r16) {
    const uint32_t u = float_bits(x);
    const uint32_t up = r16 < (u & 0xffffu);
    const bf16 sr = (bf16)((u >> 16) + up);
    return (u & 0x7fff0000u) >= 0x7f7f0000u ? store_bf16(x) : sr;
}

#ifdef HAVE_F16
static inline uint16_t f16_bits(f16 x) {
    union { uint16_t u; f16 h; } v;
    v.h = x;
    return v.u;
}
static inline f16 bits_f16(uint16_t x) {
    union { uint16_t u; f16 h; } v;
    v.u = x;
    return v.h;
}
/* fp16: lo the neighbour toward zero (one below the nearest where that is above |x|), hi the
   next away from zero; frac = (|x| - lo) / (hi - lo) is exact in float32 (the gap is a power of
   two). Where hi is inf (lo the largest finite fp16, or x inf or nan) round to nearest. */
static inline f16 store_sr_f16(float x, uint32_t r16) {
    const f16 nearest = (f16)x;
    const uint16_t bits = f16_bits(nearest), sign = bits & 0x8000u;
    const float ax = fabsf(x);
    const uint16_t lo = (uint16_t)((bits & 0x7fffu) - (fabsf((float)nearest) > ax));
    const float lo_f = (float)bits_f16(lo), hi_f = (float)bits_f16((uint16_t)(lo + 1));
    const uint16_t up = (float)r16 < (ax - lo_f) / (hi_f - lo_f) * 65536.0f;
    return lo >= 0x7bffu ? nearest : bits_f16((uint16_t)(sign | (lo + up)));
}
#endif

/* the threads worth waking for `units` of work taken `per_thread` at a time: at most n_threads, at least
   one; a step of a few small tensors runs on one thread instead of paying to wake the others */
static inline int threads_for(int64_t units, int64_t per_thread, int n_threads) {
    const int64_t useful = (units + per_thread - 1) / per_thread;
    return useful < 1 ? 1 : useful < n_threads ? (int)useful : n_threads;
}

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
