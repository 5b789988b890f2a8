/* Helpers of the 8-bit (blockwise) CPU kernels, Note [8-bit states] in optimizer/_8bit.py,
 * pasted after fused_prelude.h: print a kernel's translation unit with
 *     python -m optimizer kernel-source adamw8bit
 * Each state value is a byte per value and a float32 scale per block of QBLOCK values of one
 * row. Every operation is the reference's (_8bit.py), in its order, in float32. */
#define QBLOCK 256

/* Codes and their values with one quotient per block (the reference's _units and _unit): a value
   is c |c| unit (first moment, int8 c) or c^2 unit (r, uint8 c), unit = scale / levels^2; c |c| and
   c^2 are exact integers in float32 */
static inline float decode_signed(uint8_t code, float unit) {
    const int32_t c = (int8_t)code;
    return (float)(c * abs(c)) * unit;
}
static inline float decode_root(uint8_t code, float unit) {
    const int32_t c = code;
    return (float)(c * c) * unit;
}
#define SIGNED_LEVELS2 16129.0f /* 127^2 */
#define ROOT_LEVELS2 65025.0f   /* 255^2 */
#define SIGNED_UNIT(scale) ((scale) / SIGNED_LEVELS2)
#define ROOT_UNIT(scale) ((scale) / ROOT_LEVELS2)

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

/* The codes of a block whose scale is given (its block_scale, stored with the codes), from
   u = levels^2 |x| / scale: |x| k, k = levels^2 / scale once per block where k is finite, else
   (|x| / scale) levels^2 (scales below levels^2 / FLT_MAX). Where the scale is 0 (a block of zeros),
   inf or NaN the reference's codes are 0 (|x| / scale is 0 or NaN, and nan_to_num). */
static inline void encode_signed(const float *restrict x, int n, uint8_t *restrict codes, float *restrict scale_out,
                                 float scale) {
    const float k = SIGNED_LEVELS2 / scale;
    *scale_out = scale;
    if (scale > 0.0f && scale < INFINITY) {
        for (int i = 0; i < n; i++) {
            /* floor(sqrt(u) + 0.5) with x's sign: a truncation of a signed value (u <= 127^2 (1 + 2^-23)
               where k is finite: below 127.5^2); -0 where x is -0, whose code is 0 */
            const float u = k < INFINITY ? fabsf(x[i]) * k : fabsf(x[i]) / scale * SIGNED_LEVELS2;
            codes[i] = (uint8_t)(int32_t)copysignf(sqrtf(u) + 0.5f, x[i]); /* as an int8 */
        }
    } else {
        for (int i = 0; i < n; i++) codes[i] = 0;
    }
}

/* the second moment's code of u = x^2, x = 255 sqrt(r / scale) in [0, 255] the code unrounded,
   rounded stochastically, unbiased for v = r^2: lo = floor(x), plus 1 iff
   bits (hi^4 - lo^4) < (u^2 - lo^4) 65536 (hi = lo + 1), at most 255; the 16 bits a hash of r's
   bits but the last 8 and the step's seed */
static inline int32_t root_code(float u, float r, uint32_t seed) {
    const float lo = floorf(sqrtf(u)), hi = lo + 1.0f;
    const float lo2 = lo * lo, hi2 = hi * hi;
    const float bits = (float)(mix32((float_bits(r) >> 8) ^ seed) >> 16);
    const int32_t c = (int32_t)lo + (bits * (hi2 * hi2 - lo2 * lo2) < (u * u - lo2 * lo2) * 65536.0f);
    return c < 255 ? c : 255; /* u may pass 255^2 by an ulp */
}

/* as encode_signed, 255 levels rounded by root_code, and at least 1 where r > 0 (also where the
   scale is inf or NaN: the reference clamps after nan_to_num) */
static inline void encode_root(const float *restrict r, int n, uint8_t *restrict codes, float *restrict scale_out,
                               float scale, uint32_t seed) {
    const float k = ROOT_LEVELS2 / scale;
    *scale_out = scale;
    if (scale > 0.0f && scale < INFINITY) {
        for (int i = 0; i < n; i++) {
            const float u = k < INFINITY ? r[i] * k : r[i] / scale * ROOT_LEVELS2;
            const int32_t c = root_code(u, r[i], seed), positive = r[i] > 0.0f;
            codes[i] = (uint8_t)(c > positive ? c : positive);
        }
    } else {
        for (int i = 0; i < n; i++) codes[i] = r[i] > 0.0f;
    }
}
