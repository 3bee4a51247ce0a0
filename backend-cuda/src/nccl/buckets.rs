//! Grouping gradient tensors into all-reduce buckets. Pure arithmetic, tested without a GPU.
//!
//! Each bucket becomes one NCCL group (`ncclGroupStart` .. `ncclGroupEnd`), which NCCL fuses into
//! one launch: a few large collectives instead of one small one per tensor (a ViT-B has about
//! 150 gradient tensors, many of them biases of a few KiB), while a bounded bucket keeps the
//! first collective from waiting for the whole model. Buckets run last tensor first, the order
//! the backward pass finishes them in (PyTorch DDP's 25 MiB buckets in reverse order). This plan
//! is for [`DataParallel::all_reduce_mean`](super::DataParallel::all_reduce_mean), after a
//! backward; the overlapped averaging (`overlap.rs`) fills its buckets as the backward hands
//! over its finished gradients.

/// PyTorch DDP's default bucket size: 25 MiB of gradients.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The buckets of tensors of `lens` floats (in parameter order) for buckets of at most
/// `cap_bytes`: lists of tensor indices, the last tensor first, each bucket's tensors contiguous
/// in that order. A tensor larger than the cap gets a bucket of its own; empty tensors (no
/// allocation, nothing to reduce) are left out. Every non-empty tensor is in exactly one bucket.
///
/// ```
/// use mae_backend_cuda::nccl::plan_buckets;
/// // Tensors of 4, 2, 8 and 0 floats into 24-byte buckets: 8 alone (32 bytes), then 2 and 4.
/// assert_eq!(plan_buckets(&[4, 2, 8, 0], 24), vec![vec![2], vec![1, 0]]);
/// ```
pub fn plan_buckets(lens: &[usize], cap_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for (i, &len) in lens.iter().enumerate().rev() {
        if len == 0 {
            continue;
        }
        let size = len.saturating_mul(size_of::<f32>());
        if !current.is_empty() && bytes.saturating_add(size) > cap_bytes {
            buckets.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes = bytes.saturating_add(size);
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tensor_is_in_one_bucket_in_reverse_order() {
        let lens: Vec<usize> = (0..40)
            .map(|i| (i * 7919) % 3000 + (i % 3) * 100_000)
            .collect();
        for cap in [1, 64, 4096, 1 << 20, usize::MAX] {
            let buckets = plan_buckets(&lens, cap);
            let order: Vec<usize> = buckets.iter().flatten().copied().collect();
            let expected: Vec<usize> = (0..lens.len()).rev().filter(|&i| lens[i] > 0).collect();
            assert_eq!(order, expected, "cap {cap}");
        }
    }

    #[test]
    fn buckets_stay_under_the_cap_unless_one_tensor_exceeds_it() {
        let lens = [1000, 3, 5_000_000, 7, 3_000_000, 3_000_000, 3_000_000, 12];
        let cap = DEFAULT_BUCKET_BYTES;
        let buckets = plan_buckets(&lens, cap);
        for b in &buckets {
            let bytes: usize = b.iter().map(|&i| lens[i] * 4).sum();
            assert!(bytes <= cap || b.len() == 1, "{b:?}: {bytes} bytes");
        }
        // 12, then three 12 MB tensors (36 MB > 25 MiB: two fit), ...
        assert_eq!(buckets[0], vec![7, 6, 5]);
        assert_eq!(buckets[1], vec![4, 3]);
        // ... and the 20 MB tensor does not fit with 12 MB: a new bucket with the small ones.
        assert_eq!(buckets[2], vec![2, 1, 0]);
        assert_eq!(buckets.len(), 3);
    }

    #[test]
    fn a_tensor_over_the_cap_is_alone_and_empty_input_gives_no_bucket() {
        assert_eq!(
            plan_buckets(&[10, 100, 10], 80),
            vec![vec![2], vec![1], vec![0]]
        );
        assert!(plan_buckets(&[], 80).is_empty());
        assert!(plan_buckets(&[0, 0], 80).is_empty());
        assert_eq!(plan_buckets(&[1, 1, 1], 0), vec![vec![2], vec![1], vec![0]]);
    }

    #[test]
    fn a_vit_base_fits_in_a_handful_of_buckets() {
        // MAE ViT-B/16 with its 8-block decoder: about 112 M parameters, 448 MB of gradients.
        let block = |d: usize| {
            vec![
                d,
                d,
                3 * d * d,
                3 * d,
                d * d,
                d,
                d,
                d,
                4 * d * d,
                4 * d,
                4 * d * d,
                d,
            ]
        };
        let mut lens = vec![768 * 768, 768, 768, 197 * 768];
        (0..12).for_each(|_| lens.extend(block(768)));
        (0..8).for_each(|_| lens.extend(block(512)));
        let total: usize = lens.iter().sum::<usize>() * 4;
        let buckets = plan_buckets(&lens, DEFAULT_BUCKET_BYTES);
        assert!(
            buckets.len() >= total / DEFAULT_BUCKET_BYTES,
            "{}",
            buckets.len()
        );
        assert!(buckets.len() <= 2 * total.div_ceil(DEFAULT_BUCKET_BYTES));
    }
}
