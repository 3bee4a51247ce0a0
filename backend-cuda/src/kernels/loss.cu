// The masked reconstruction loss. Sums over rows run in double in a fixed order: per-row
// results first (one block per row), then one block folds them.

// row_loss[r] = mask[r] * mean_c (pred - target)^2, in double (the difference too).
extern "C" __global__ void masked_mse_rows(const float* pred, const float* target,
                                           const float* mask, double* row_loss, u64 rows,
                                           u64 cols) {
    __shared__ double scratch[BLOCK / 32];
    FOR_EACH_ROW(r, rows) {
        double acc = 0.0;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            const double d = (double)pred[r * cols + j] - (double)target[r * cols + j];
            acc += d * d;
        }
        const double sse = block_sum(acc, scratch);
        if (threadIdx.x == 0) row_loss[r] = (double)mask[r] * (sse / (double)cols);
    }
}

// One block: loss[0] = sum(row_loss) / sum(mask). An all-zero mask gives 0 / 0 = NaN, as
// PyTorch's (loss * mask).sum() / mask.sum().
extern "C" __global__ void masked_mse_total(const double* row_loss, const float* mask,
                                            float* loss, u64 rows) {
    __shared__ double scratch[BLOCK / 32];
    double num = 0.0, den = 0.0;
    for (u64 r = threadIdx.x; r < rows; r += BLOCK) {
        num += row_loss[r];
        den += (double)mask[r];
    }
    num = block_sum(num, scratch);
    den = block_sum(den, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(num / den);
}

// One block: mask_sum[0] = sum(mask) in double, for the backward.
extern "C" __global__ void mask_sum(const float* mask, double* mask_sum, u64 rows) {
    __shared__ double scratch[BLOCK / 32];
    double acc = 0.0;
    for (u64 r = threadIdx.x; r < rows; r += BLOCK) acc += (double)mask[r];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) mask_sum[0] = acc;
}

// d_pred += d_loss * mask[r] * 2 (pred - target) / (cols * sum(mask)), in double, rounded once.
// Rows with mask 0 are not skipped, so a non-finite prediction there gives NaN as in PyTorch.
extern "C" __global__ void masked_mse_backward(const float* pred, const float* target,
                                               const float* mask, const double* mask_sum,
                                               float* d_pred, u64 rows, u64 cols,
                                               float d_loss) {
    const double coef = (double)d_loss * 2.0 / ((double)cols * mask_sum[0]);
    const u64 n = rows * cols;
    FOR_EACH(e, n) {
        const double k = coef * (double)mask[div_u(e, cols)];
        d_pred[e] = (float)((double)d_pred[e] + k * ((double)pred[e] - (double)target[e]));
    }
}
