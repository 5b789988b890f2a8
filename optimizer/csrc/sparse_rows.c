/* The loop of the sparse fused CPU kernel (SparseAdamW; Note [lazy decay] in
 * optimizer/sparse_adamw.py): one call updates the touched rows of every tensor of a step, each
 * row once, the rows handed to the threads a few at a time (OpenMP, dynamic: a thread that the
 * system deschedules does not hold the others up, and rows are few). Pasted once per dtype variant after the
 * #defines that fused_loop.c gets (FN, T, PTYPE, STYPE, N_PTRS, ROUNDS) and the algorithm's
 * KERNEL_* macros, whose body is AdamW's update of one element. The signature is fused_loop.c's,
 * read as:
 *   n_tensors   the tensors of the call
 *   ptrs        per tensor N_PTRS + 3 addresses: the parameter (contiguous), the gradient's
 *               values (its touched rows, contiguous, in the order of its row indices), each
 *               state (laid out as the parameter), then the row indices (int64, distinct: no two
 *               threads write one row), each row's decay log (double, one per row of the
 *               parameter), and three doubles: the tensor's decay log before this step, after
 *               it, and this step's factor 1 - lr wd
 *   numel       per tensor, the elements of one row
 *   first       the running count of touched rows: tensor t has rows first[t] .. first[t + 1] - 1
 *   scalars, per_tensor, maximize   as in fused_loop.c
 *   seeds       unused (NULL): SparseAdamW rounds to nearest
 * A row first pays the decay it owes, exp(log before - its log) (1 - lr wd), a product in double
 * rounded once to T; the body then updates it element by element, with that factor as `decay`;
 * the row's log becomes the tensor's log after the step. */
#define SPARSE_PTRS (N_PTRS + 3)
void FN(int64_t n_tensors, void *const *ptrs, const int64_t *numel, const int64_t *first,
        const double *scalars, const double *per_tensor, int maximize, const uint32_t *seeds, int n_threads) {
    KERNEL_SCALARS
    (void)scalars;
    (void)per_tensor;
    (void)seeds;
    const int threads = threads_for(first[n_tensors], 8, n_threads); /* runs of 8 rows */
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
#endif
    for (int64_t b = 0; b < first[n_tensors]; b++) {
        const int64_t t = tensor_of(b, first, n_tensors), r = b - first[t], len = numel[t];
        void *const *tp = ptrs + t * SPARSE_PTRS;
        const int64_t row = ((const int64_t *)tp[N_PTRS])[r];
        double *restrict logs = (double *)tp[N_PTRS + 1];
        const double *lazy = (const double *)tp[N_PTRS + 2];
        const T decay = (T)(exp(lazy[0] - logs[row]) * lazy[2]); /* prod (1 - lr_s wd) since it was last paid */
        logs[row] = lazy[1];
        PTYPE *restrict P = (PTYPE *)tp[0];
        const PTYPE *restrict G = (const PTYPE *)tp[1] + r * len;
        KERNEL_STATES
        KERNEL_PER_TENSOR
        for (int64_t j = 0; j < len; j++) {
            const int64_t i = row * len + j; /* the element's index in the parameter and its states */
            T p = CAT(load_, PTYPE)(P[i]);
            T g = CAT(load_, PTYPE)(G[j]);
            if (maximize) g = -g;
            KERNEL_LOAD
            KERNEL_BODY
            P[i] = CAT(store_, PTYPE)(p);
            KERNEL_STORE
        }
    }
}
#undef SPARSE_PTRS
