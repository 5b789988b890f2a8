/* The loop of the 8-bit kernels (Note [8-bit states] in optimizer/_8bit.py): one call
 * updates every block of QBLOCK values of every tensor of a step once; the blocks are
 * shared by the threads. A tensor is seen as rows x cols (rows its first dimension), each row
 * cut into ceil(cols / QBLOCK) blocks, contiguous in memory; block k of a tensor is row
 * blk / blocks_per_row, and its scales are scale[blk]. Per block: decode the states into
 * buf_<name>[] (a loop of their own), update each value in float32, store the parameter, keep the
 * new states in buf_<name>[] and their running largest magnitude in top_<name>, then encode them
 * (the block's scale needs every new value first). Short loops over a block held in stack buffers:
 * each vectorises with few values live at a time.
 * Pasted once per parameter dtype after:
 *   FN            the function's name, e.g. adamw8bit_float_u8
 *   T             the compute type (float)
 *   PTYPE         the storage type of the parameter and its gradient (float, bf16, f16)
 *   N_PTRS        pointers per tensor: parameter, gradient, the codes of each state, the
 *                 scales of each state
 *   ROUNDS        1 where the parameter (bf16, f16) can be rounded stochastically
 * and the algorithm's own (written beside its Python reference, in optimizer/<name>8bit.py):
 *   KERNEL_SCALARS      declares the scalars shared by all tensors, from scalars[]
 *   KERNEL_STATES       declares, for the block at element offset `base` and scale index `blk`,
 *                       the codes C_<name>, scales Z_<name>, scale z_<name>, buffer buf_<name>
 *                       and the bits of the largest new magnitude top_<name>
 *   KERNEL_PER_TENSOR   declares the per-tensor values of tensor t, from per_tensor[]
 *   KERNEL_DECODE       decodes the block's states into buf_<name>[]
 *   KERNEL_LOAD         reads the decoded states of value i of the block
 *   KERNEL_BODY         the update of one value: reads and assigns p, g and the states
 *   KERNEL_KEEP         keeps the new states of value i in buf_<name>[i], and their largest magnitude
 *   KERNEL_ENCODE       encodes the buffers into codes and scales
 * cols[] holds the row length of each tensor, first[] the running count of blocks, seeds[] one
 * 32-bit seed per tensor to round the parameters stochastically (Note [stochastic rounding]),
 * or NULL to round them to nearest. */
#define BLOCKWISE_VALUE(STORE_P)                \
    {                                           \
        T p = CAT(load_, PTYPE)(P[i]);          \
        T g = CAT(load_, PTYPE)(G[i]) * g_sign; \
        KERNEL_LOAD                             \
        KERNEL_BODY                             \
        P[i] = STORE_P;                         \
        KERNEL_KEEP                             \
    }
/* one block of n values: n is the constant QBLOCK for whole blocks (loops of a known trip count,
   without remainders), the row's remainder for the last block of a row whose length is not a
   multiple of QBLOCK */
#if ROUNDS
#define BLOCKWISE_BLOCK                                                                                      \
    {                                                                                                        \
        KERNEL_STATES                                                                                        \
        KERNEL_DECODE                                                                                        \
        if (seeds != NULL) {                                                                                 \
            const uint32_t seed = seeds[t];                                                                  \
            for (int i = 0; i < n; i++) BLOCKWISE_VALUE(CAT(store_sr_, PTYPE)(p, random16(base + i, seed))) \
        } else {                                                                                             \
            for (int i = 0; i < n; i++) BLOCKWISE_VALUE(CAT(store_, PTYPE)(p))                               \
        }                                                                                                    \
        KERNEL_ENCODE                                                                                        \
    }
#else
#define BLOCKWISE_BLOCK                                                        \
    {                                                                          \
        KERNEL_STATES                                                          \
        KERNEL_DECODE                                                          \
        for (int i = 0; i < n; i++) BLOCKWISE_VALUE(CAT(store_, PTYPE)(p))     \
        KERNEL_ENCODE                                                          \
    }
#endif
void FN(int64_t n_tensors, void *const *ptrs, const int64_t *cols, const int64_t *first,
        const double *scalars, const double *per_tensor, int maximize, const uint32_t *seeds, int n_threads) {
    KERNEL_SCALARS
    (void)scalars;
    (void)per_tensor;
    (void)seeds;
    (void)n_threads;
    const T g_sign = maximize ? -1 : 1; /* -g exactly, without a branch per value */
    /* Each thread takes runs of consecutive blocks, 1/8 of its share at a time (at least 64 blocks,
       16384 values): long runs keep its memory streams long (the prefetchers follow them; short runs
       of the threads interleaved cost bandwidth), and 8 runs a thread still let the threads finish
       together where one of them shares its core with another process. */
    const int64_t n_blocks = first[n_tensors], share = n_blocks / (8 * (n_threads > 1 ? n_threads : 1));
    const int64_t run = share > 64 ? share : 64;
    const int threads = threads_for(n_blocks, run, n_threads);
    (void)run;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, run) num_threads(threads)
#endif
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t t = tensor_of(b, first, n_tensors), blk = b - first[t];
        const int64_t per_row = (cols[t] + QBLOCK - 1) / QBLOCK, row = blk / per_row, j = blk - row * per_row;
        const int64_t base = row * cols[t] + j * QBLOCK;  /* the block's first value in the tensor */
        void *const *tp = ptrs + t * N_PTRS;
        PTYPE *restrict P = (PTYPE *)tp[0] + base;
        const PTYPE *restrict G = (const PTYPE *)tp[1] + base;
        KERNEL_PER_TENSOR
        if (cols[t] - j * QBLOCK >= QBLOCK) {
            const int n = QBLOCK;
            BLOCKWISE_BLOCK
        } else {
            const int n = (int)(cols[t] - j * QBLOCK);
            BLOCKWISE_BLOCK
        }
    }
}
#undef BLOCKWISE_VALUE
#undef BLOCKWISE_BLOCK
