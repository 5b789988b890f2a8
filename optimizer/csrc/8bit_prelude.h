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
/* A block that holds an infinity or a NaN ("special", Note [8-bit states]) has its largest finite
   magnitude as its scale, stored negated; its finite values are coded on 126 (signed) or 253 (root)
   levels, and the top codes are the others: signed 127 = +inf, -127 = -inf, -128 = NaN; root
   255 = inf, 254 = NaN. Such blocks are rare (one overflow makes one, and it stays): their code is
   out of line, so that an ordinary block's loops are what they were. */
#define SIGNED_SPECIAL_LEVELS2 15876.0f /* 126^2 */
#define ROOT_SPECIAL_LEVELS2 64009.0f   /* 253^2 */
static inline int special_scale(float scale) { return (int)(float_bits(scale) >> 31); }
/* the largest scale, the float below the largest (the reference's MAX_SCALE): at the largest, the top
   code would decode to levels^2 RN(scale / levels^2) = inf */
#define MAX_SCALE_BITS 0x7f7ffffeu
static inline float capped_scale(uint32_t top) { return bits_float(top < MAX_SCALE_BITS ? top : MAX_SCALE_BITS); }

#if defined(__GNUC__)
#define COLD __attribute__((noinline, cold))
#else
#define COLD
#endif

static COLD void decode_signed_special(const uint8_t *restrict codes, int n, float *restrict out, float scale) {
    const float unit = fabsf(scale) / SIGNED_SPECIAL_LEVELS2;
    for (int i = 0; i < n; i++) {
        const int32_t c = (int8_t)codes[i];
        out[i] = c == -128 ? NAN : c == 127 ? INFINITY : c == -127 ? -INFINITY : decode_signed(codes[i], unit);
    }
}
static COLD void decode_root_special(const uint8_t *restrict codes, int n, float *restrict out, float scale) {
    const float unit = fabsf(scale) / ROOT_SPECIAL_LEVELS2;
    for (int i = 0; i < n; i++) out[i] = codes[i] == 255 ? INFINITY : codes[i] == 254 ? NAN : decode_root(codes[i], unit);
}
/* a block's values from its codes and scale */
static inline void decode_signed_block(const uint8_t *restrict codes, int n, float *restrict out, float scale) {
    if (special_scale(scale)) {
        decode_signed_special(codes, n, out, scale);
    } else {
        const float unit = SIGNED_UNIT(scale);
        for (int i = 0; i < n; i++) out[i] = decode_signed(codes[i], unit);
    }
}
static inline void decode_root_block(const uint8_t *restrict codes, int n, float *restrict out, float scale) {
    if (special_scale(scale)) {
        decode_root_special(codes, n, out, scale);
    } else {
        const float unit = ROOT_UNIT(scale);
        for (int i = 0; i < n; i++) out[i] = decode_root(codes[i], unit);
    }
}

/* The bits of a block's largest |x|: |x| is the float's bits without the sign, and the bits of
   non-negative floats order as their values, with every NaN above inf: a running integer max (kept
   by the update loop as it writes each new value, no pass of its own), no branch. Below 0x7f800000
   the block is ordinary and this is its scale (capped); from there on it holds an infinity or a NaN. */
static inline uint32_t top_bits(uint32_t top, float x) {
    const uint32_t a = float_bits(x) & 0x7fffffffu;
    return a > top ? a : top;
}
static inline uint32_t block_top(const float *restrict x, int n) {
    uint32_t top = 0;
    for (int i = 0; i < n; i++) top = top_bits(top, x[i]);
    return top;
}
/* a special block's scale: its largest finite |x| (capped) */
static inline float finite_top(const float *restrict x, int n) {
    uint32_t top = 0;
    for (int i = 0; i < n; i++) {
        const uint32_t a = float_bits(x[i]) & 0x7fffffffu;
        top = a > top && a < 0x7f800000u ? a : top;
    }
    return capped_scale(top);
}

/* u = levels^2 |x| / scale for a finite x, scale > 0: |x| k, k = levels^2 / scale once per block where
   k is finite, else (|x| / scale) levels^2 (scales below levels^2 / FLT_MAX) */
static inline float units(float a, float scale, float k, float levels2) {
    return k < INFINITY ? a * k : a / scale * levels2;
}
/* the signed code of a finite x: floor(sqrt(u) + 0.5) with x's sign, a truncation of a signed value
   (u <= levels^2 (1 + 2^-23) where k is finite: below (levels + 0.5)^2); -0 where x is -0, whose code is 0 */
static inline uint8_t signed_code(float x, float scale, float k, float levels2) {
    return (uint8_t)(int32_t)copysignf(sqrtf(units(fabsf(x), scale, k, levels2)) + 0.5f, x); /* as an int8 */
}

static COLD void encode_signed_special(const float *restrict x, int n, uint8_t *restrict codes,
                                       float *restrict scale_out) {
    const float scale = finite_top(x, n), k = SIGNED_SPECIAL_LEVELS2 / scale;
    *scale_out = -scale;
    for (int i = 0; i < n; i++) {
        const uint32_t a = float_bits(x[i]) & 0x7fffffffu;
        codes[i] = a > 0x7f800000u    ? (uint8_t)-128
                   : a == 0x7f800000u ? (uint8_t)(x[i] > 0.0f ? 127 : -127)
                   : scale > 0.0f     ? signed_code(x[i], scale, k, SIGNED_SPECIAL_LEVELS2)
                                      : 0;
    }
}

/* The codes and scale of a block whose largest magnitude has the bits `top` (block_top). A block of
   zeros has scale 0 and codes 0. */
static inline void encode_signed(const float *restrict x, int n, uint8_t *restrict codes, float *restrict scale_out,
                                 uint32_t top) {
    if (top - 1u < 0x7f7fffffu) { /* 0 < scale < inf: an ordinary block */
        const float scale = capped_scale(top), k = SIGNED_LEVELS2 / scale;
        *scale_out = scale;
        for (int i = 0; i < n; i++) codes[i] = signed_code(x[i], scale, k, SIGNED_LEVELS2);
    } else if (top == 0) {
        *scale_out = 0.0f;
        for (int i = 0; i < n; i++) codes[i] = 0;
    } else {
        encode_signed_special(x, n, codes, scale_out);
    }
}

/* the second moment's code of a finite r, u = x^2, x = levels sqrt(r / scale) in [0, levels] the code
   unrounded, rounded stochastically, unbiased for v = r^2: lo = floor(x), plus 1 iff
   bits (hi^4 - lo^4) < (u^2 - lo^4) 65536 (hi = lo + 1), at most levels; the 16 bits a hash of r's
   bits but the last 8 and the step's seed; at least 1 where r > 0 */
static inline uint8_t root_code(float r, float scale, float k, float levels2, int32_t levels, uint32_t seed) {
    const float u = units(r, scale, k, levels2);
    const float lo = floorf(sqrtf(u)), hi = lo + 1.0f;
    const float lo2 = lo * lo, hi2 = hi * hi;
    const float bits = (float)(mix32((float_bits(r) >> 8) ^ seed) >> 16);
    int32_t c = (int32_t)lo + (bits * (hi2 * hi2 - lo2 * lo2) < (u * u - lo2 * lo2) * 65536.0f);
    c = c < levels ? c : levels; /* u may pass levels^2 by an ulp */
    const int32_t positive = r > 0.0f;
    return (uint8_t)(c > positive ? c : positive);
}

static COLD void encode_root_special(const float *restrict r, int n, uint8_t *restrict codes, float *restrict scale_out,
                                     uint32_t seed) {
    const float scale = finite_top(r, n), k = ROOT_SPECIAL_LEVELS2 / scale;
    *scale_out = -scale;
    for (int i = 0; i < n; i++) {
        codes[i] = r[i] != r[i]         ? 254
                   : r[i] == INFINITY ? 255
                   : scale > 0.0f     ? root_code(r[i], scale, k, ROOT_SPECIAL_LEVELS2, 253, seed)
                                      : 0;
    }
}

/* as encode_signed, 255 levels rounded by root_code */
static inline void encode_root(const float *restrict r, int n, uint8_t *restrict codes, float *restrict scale_out,
                               uint32_t top, uint32_t seed) {
    if (top - 1u < 0x7f7fffffu) {
        const float scale = capped_scale(top), k = ROOT_LEVELS2 / scale;
        *scale_out = scale;
        for (int i = 0; i < n; i++) codes[i] = root_code(r[i], scale, k, ROOT_LEVELS2, 255, seed);
    } else if (top == 0) {
        *scale_out = 0.0f;
        for (int i = 0; i < n; i++) codes[i] = 0;
    } else {
        encode_root_special(r, n, codes, scale_out, seed);
    }
}
