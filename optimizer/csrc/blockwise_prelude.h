/* Helpers of the 8-bit (blockwise) CPU kernels, Note [8-bit states] in optimizer/_quant.py,
 * pasted after fused_prelude.h: print a kernel's translation unit with
 *     python -m optimizer kernel-source adamw8bit
 * Each state value is a byte per value and a float32 scale per block of QBLOCK values of one
 * row. Every operation is the reference's (_quant.py), in its order, in float32. */
#define QBLOCK 256

/* |c| / levels rounded to nearest for an integer code 0 <= |c| <= 255, without a division (the
   divider also takes the square roots, and is the loop's bottleneck): with a fast fma,
   RN(|c| hi + |c| lo) where hi + lo = 1 / levels to 40 bits and |c| hi is exact (hi has 16
   significant bits); it equals RN(|c| / levels) for every code (checked for all of them in
   tests/test_lean_c.py). Without a fast fma, the division. */
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
#define CODE_QUOTIENT(c, hi, lo, levels) fmaf((c), (lo), (c) * (hi))
#else
#define CODE_QUOTIENT(c, hi, lo, levels) ((c) / (levels))
#endif
#define CODE_OVER_127(c) CODE_QUOTIENT(c, 0x1.0204p-7f, 0x1.020408p-28f, 127.0f)
#define CODE_OVER_255(c) CODE_QUOTIENT(c, 0x1.01p-8f, 0x1.010102p-24f, 255.0f)

/* first moment, signed: the code is an int8 c, decoded as sign(c) (|c| / 127)^2 scale */
static inline float decode_signed(uint8_t code, float scale) {
    const float c = (float)(int8_t)code;
    const float a = CODE_OVER_127(fabsf(c));
    return copysignf(a * a * scale, c); /* sign(c) x: -x for c < 0, x for c = 0 (as 0 x) */
}

/* second moment, stored as its root r: the code is a uint8 c, decoded as (c / 255)^2 scale */
static inline float decode_root(uint8_t code, float scale) {
    const float a = CODE_OVER_255((float)code);
    return a * a * scale;
}

/* x / d rounded to nearest, given inv = 1 / d, for finite x / d (quotient() without its check
   for an infinite quotient): where 0 <= x <= d, as x = |value| / block scale */
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
static inline float quotient_finite(float x, float d, float inv) {
    const float q = x * inv;
    return fmaf(fmaf(-q, d, x), inv, q);
}
#else
static inline float quotient_finite(float x, float d, float inv) {
    (void)inv;
    return x / d;
}
#endif

/* The block's scale: its largest |x|, NaN if it holds a NaN (as torch.amax). |x| is the float's
   bits without the sign, and the bits of non-negative floats order as their values, with every
   NaN above inf: a running integer max (kept by the update loop as it writes each new value, no
   pass of its own), no branch. */
static inline uint32_t top_bits(uint32_t top, float x) {
    const uint32_t a = float_bits(x) & 0x7fffffffu;
    return a > top ? a : top;
}
static inline float scale_of_top(uint32_t top) { return top > 0x7f800000u ? NAN : bits_float(top); }
static inline float block_scale(const float *restrict x, int n) {
    uint32_t top = 0;
    for (int i = 0; i < n; i++) top = top_bits(top, x[i]);
    return scale_of_top(top);
}

/* codes floor(levels sqrt(|x| / scale) + 0.5) of a block whose scale is given (its block_scale),
   stored with the codes; in [0, levels] where the scale is positive and finite; where it is 0 (a
   block of zeros), inf or NaN (|x| / scale is 0 or NaN) the reference's codes are 0 (nan_to_num).
   |x| / scale by quotient() where the scale and its inverse are normal (every |x| / scale that has
   a nonzero code is then normal too), else by a division. */
#define SAFE_SCALE(s) ((s) >= 0x1p-120f && (s) <= 0x1p120f)
static inline void encode_signed(const float *restrict x, int n, uint8_t *restrict codes, float *restrict scale_out,
                                 float scale) {
    const float inv = 1.0f / scale;
    *scale_out = scale;
    if (SAFE_SCALE(scale)) {
        /* computed as int32 and narrowed in a loop of its own: the loop of floats then runs 8 values
           a vector (not the 32 of a vector of bytes), and keeps its values in registers */
        int32_t c32[QBLOCK];
        for (int i = 0; i < n; i++) {
            /* |x| <= scale: the quotient is finite, and the code's floor of a non-negative value a truncation */
            const int32_t c = (int32_t)(sqrtf(quotient_finite(fabsf(x[i]), scale, inv)) * 127.0f + 0.5f);
            const int32_t negative = (int32_t)float_bits(x[i]) >> 31; /* -1 where x < 0 (or -0: c is 0) */
            c32[i] = (c ^ negative) - negative;                       /* sign(x) c */
        }
        for (int i = 0; i < n; i++) codes[i] = (uint8_t)c32[i];      /* as an int8 */
    } else if (scale > 0.0f && scale < INFINITY) {
        for (int i = 0; i < n; i++) {
            const int c = (int)floorf(sqrtf(fabsf(x[i]) / scale) * 127.0f + 0.5f);
            codes[i] = (uint8_t)(x[i] < 0.0f ? -c : c);
        }
    } else {
        for (int i = 0; i < n; i++) codes[i] = 0;
    }
}

/* the second moment's code of x = 255 sqrt(r / scale) in [0, 255], rounded stochastically,
   unbiased for v = r^2: floor(x), plus 1 iff bits (hi^4 - lo^4) < (x^4 - lo^4) 65536, the 16
   bits a hash of r's bits but the last 8 and the step's seed */
static inline int root_code(float x, float r, uint32_t seed) {
    const float lo = floorf(x), hi = lo + 1.0f;
    const float x2 = x * x, lo2 = lo * lo, hi2 = hi * hi;
    const float bits = (float)(mix32((float_bits(r) >> 8) ^ seed) >> 16);
    return (int)lo + (bits * (hi2 * hi2 - lo2 * lo2) < (x2 * x2 - lo2 * lo2) * 65536.0f);
}

/* as encode_signed with 255 levels rounded by root_code, and at least 1 where r > 0 (also where
   the scale is inf or NaN: the reference clamps after nan_to_num) */
static inline void encode_root(const float *restrict r, int n, uint8_t *restrict codes, float *restrict scale_out,
                               float scale, uint32_t seed) {
    const float inv = 1.0f / scale;
    *scale_out = scale;
    if (SAFE_SCALE(scale)) {
        int32_t c32[QBLOCK]; /* as in encode_signed: int32 codes, narrowed in a loop of their own */
        for (int i = 0; i < n; i++) {
            const int32_t c = root_code(sqrtf(quotient_finite(r[i], scale, inv)) * 255.0f, r[i], seed), positive = r[i] > 0.0f;
            c32[i] = c > positive ? c : positive;
        }
        for (int i = 0; i < n; i++) codes[i] = (uint8_t)c32[i];
    } else if (scale > 0.0f && scale < INFINITY) {
        for (int i = 0; i < n; i++) {
            const int c = root_code(sqrtf(r[i] / scale) * 255.0f, r[i], seed), positive = r[i] > 0.0f;
            codes[i] = (uint8_t)(c > positive ? c : positive);
        }
    } else {
        for (int i = 0; i < n; i++) codes[i] = r[i] > 0.0f;
    }
}
