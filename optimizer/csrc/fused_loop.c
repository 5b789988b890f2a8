/* The loop of every fused CPU kernel (Note [fused CPU] in optimizer/_fused_cpu.py): one
 * call updates every element of every tensor of a step once, in blocks of BLOCK elements
 * shared by the threads. Pasted once per dtype variant after these #defines:
 *   FN            the function's name, e.g. adamw_float_float
 *   T             the compute type (float or double)
 *   PTYPE, STYPE  the storage types of the parameter and of the states (float, double, bf16, f16)
 *   N_PTRS        pointers per tensor: parameter, gradient, then one per state
 *   ROUNDS        1 where the parameter (bf16, f16) can be rounded stochastically
 * and the algorithm's own (written beside its Python reference, in optimizer/<name>.py):
 *   KERNEL_SCALARS      declares the scalars shared by all tensors, from scalars[]
 *   KERNEL_STATES       declares a pointer S_<name> per state, from tp[2], tp[3], ...
 *   KERNEL_PER_TENSOR   declares the per-tensor values of tensor t, from per_tensor[]
 *   KERNEL_LOAD, KERNEL_STORE   read and write the states of element i
 *   KERNEL_BODY         the update of one element: reads and assigns p, g and the states
 * ptrs holds, per tensor, N_PTRS addresses; first[] the running count of blocks; seeds[] one
 * 32-bit seed per tensor to round the parameters stochastically (Note [stochastic rounding]
 * in optimizer/_rounding.py), or NULL to round them to nearest. */
#define FUSED_ELEMENT(STORE_P)                  \
    {                                           \
        T p = CAT(load_, PTYPE)(P[i]);          \
        T g = CAT(load_, PTYPE)(G[i]);          \
        if (maximize) g = -g;                   \
        KERNEL_LOAD                             \
        KERNEL_BODY                             \
        P[i] = STORE_P;                         \
        KERNEL_STORE                            \
    }
void FN(int64_t n_tensors, void *const *ptrs, const int64_t *numel, const int64_t *first,
        const double *scalars, const double *per_tensor, int maximize, const uint32_t *seeds, int n_threads) {
    KERNEL_SCALARS
    (void)scalars;
    (void)per_tensor;
    (void)seeds;
    const int threads = threads_for(first[n_tensors], 1, n_threads); /* a block each at least */
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t b = 0; b < first[n_tensors]; b++) {
        const int64_t t = tensor_of(b, first, n_tensors), lo = (b - first[t]) * BLOCK;
        const int64_t hi = lo + BLOCK < numel[t] ? lo + BLOCK : numel[t];
        void *const *tp = ptrs + t * N_PTRS;
        PTYPE *restrict P = (PTYPE *)tp[0];
        const PTYPE *restrict G = (const PTYPE *)tp[1];
        KERNEL_STATES
        KERNEL_PER_TENSOR
#if ROUNDS
        if (seeds != NULL) {
            const uint32_t seed = seeds[t];
            for (int64_t i = lo; i < hi; i++) FUSED_ELEMENT(CAT(store_sr_, PTYPE)(p, random16(i, seed)))
            continue;
        }
#endif
        for (int64_t i = lo; i < hi; i++) FUSED_ELEMENT(CAT(store_, PTYPE)(p))
    }
}
#undef FUSED_ELEMENT
