//! Weight gradients split along k where their output cannot fill the card.
//!
//! A Linear layer's weight gradient `dW = dY^T X` has the weight as its output (from 512 x 512
//! to 3,072 x 768 in ViT-B/16's MAE) and the batch's token rows as `k` (12,800 in the encoder
//! and 50,432 in the decoder at batch 256). A GEMM kernel computes each tile of the output in
//! one thread block that walks all of `k`, so such a product may run a few dozen blocks on a
//! card of 132 multiprocessors while the rest idle. cuBLASLt says how full its choice keeps
//! the card (`wavesCount` of the heuristic: blocks over the blocks the card holds at once).
//! Where that is under one wave by enough, `lt.rs` runs the product as one batched call over
//! [`chunks`] slices of `k` rows, each writing its partial product and, from the bias-gradient
//! epilogue, its partial column sums into scratch, and `sum_partials_f32` adds the partials in
//! a fixed order in f64: deterministic, as the rest of the backend (no atomics), and the same
//! product within the GEMM's tolerance. `MAE_CUDA_WEIGHT_GRAD_SPLIT=off` keeps one product.

#[cfg(test)]
use crate::backend::choice;
use crate::backend::env_choice;
use mae::backend::BResult;

/// Whether weight gradients may be split along k (`MAE_CUDA_WEIGHT_GRAD_SPLIT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum WeightGradSplit {
    /// Split where cuBLASLt's own choice fills less of the card than [`chunks`] would.
    #[default]
    Auto,
    /// One product, as cuBLASLt chooses it.
    Off,
}

impl WeightGradSplit {
    const CHOICES: [(&'static str, WeightGradSplit); 2] = [
        ("auto", WeightGradSplit::Auto),
        ("off", WeightGradSplit::Off),
    ];

    /// Reads `MAE_CUDA_WEIGHT_GRAD_SPLIT`; unset is [`WeightGradSplit::Auto`].
    pub(crate) fn from_env() -> BResult<WeightGradSplit> {
        Ok(env_choice("MAE_CUDA_WEIGHT_GRAD_SPLIT", &Self::CHOICES)?.unwrap_or_default())
    }

    #[cfg(test)]
    fn parse(v: &str) -> BResult<WeightGradSplit> {
        choice("MAE_CUDA_WEIGHT_GRAD_SPLIT", v, &Self::CHOICES)
    }
}

/// Fewest rows of `k` a chunk takes: below this each chunk's partial output costs as many
/// bytes as its product has FLOPs to hide them (a 512-row chunk does 1,024 FLOPs per 4-byte
/// partial it writes).
pub(crate) const MIN_CHUNK_ROWS: usize = 512;

/// A chunk's rows are a multiple of this, so that every chunk of a bf16 operand starts on a
/// 16-byte boundary, as the first does.
const CHUNK_ROWS_MULTIPLE: usize = 8;

/// Most chunks: their partials take `chunks x m x n` floats of scratch, read again by the sum.
pub(crate) const MAX_CHUNKS: usize = 32;

/// A split must keep at least this share of the multiprocessors busy...
const BUSY_ENOUGH: f32 = 0.75;

/// ...and this many times the share that one product keeps busy, or it is not worth its
/// partials.
const GAIN: f32 = 1.25;

/// The share of the multiprocessors' time that `chunks` chunks keep busy when one product
/// takes `waves` waves: the blocks run in whole waves, the last one partly full.
fn busy(chunks: usize, waves: f32) -> f32 {
    let w = chunks as f32 * waves;
    w / w.ceil()
}

/// Into how many chunks of rows to split a product over `k` rows whose unsplit kernel takes
/// `waves` waves (1: do not split). Only products under one wave split, into a number of chunks
/// that divides `k` (one batched call takes chunks of one size) with at least
/// [`MIN_CHUNK_ROWS`] rows each, a multiple of [`CHUNK_ROWS_MULTIPLE`]: the fewest that keep [`BUSY_ENOUGH`] of the card busy, else the
/// busiest, and only where that is [`GAIN`] times what one product keeps busy.
pub(crate) fn chunks(k: usize, waves: f32) -> usize {
    // Also refuses NaN and the zero the heuristic may report when it does not know.
    if !(waves > 0.0 && waves < 1.0) {
        return 1;
    }
    let candidates = (2..=MAX_CHUNKS).filter(|&s| splits_into(k, s));
    let mut best = (1, busy(1, waves));
    for s in candidates {
        let b = busy(s, waves);
        if b >= BUSY_ENOUGH {
            best = (s, b);
            break;
        }
        if b > best.1 {
            best = (s, b);
        }
    }
    if best.1 >= GAIN * busy(1, waves) {
        best.0
    } else {
        1
    }
}

/// Whether `k` rows split into `s` chunks that one batched call takes: equal, of at least
/// [`MIN_CHUNK_ROWS`] rows, a multiple of [`CHUNK_ROWS_MULTIPLE`].
fn splits_into(k: usize, s: usize) -> bool {
    k % s == 0 && k / s >= MIN_CHUNK_ROWS && (k / s) % CHUNK_ROWS_MULTIPLE == 0
}

/// The chunk counts that tuning (`lt/tuning.rs`) times for a product over `k` rows whose unsplit
/// kernel takes `waves` waves: [`chunks`]' estimate first, then the whole product and the
/// powers of two that split `k`.
pub(crate) fn tuning_candidates(k: usize, waves: f32) -> Vec<usize> {
    let mut counts = vec![chunks(k, waves), 1];
    let powers = (1..).map(|p| 1usize << p).take_while(|&s| s <= MAX_CHUNKS);
    counts.extend(powers.filter(|&s| splits_into(k, s)));
    let mut seen = vec![];
    counts.retain(|&s| {
        let new = !seen.contains(&s);
        seen.push(s);
        new
    });
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_fill_the_card_are_not_split() {
        for waves in [1.0, 1.3, 4.0, 0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert_eq!(chunks(50_432, waves), 1, "waves {waves}");
        }
    }

    #[test]
    fn the_fewest_chunks_that_keep_the_card_busy() {
        // ViT-B/16's decoder at batch 256 (k = 256 x 197 = 2^8 x 197): 32 blocks of a
        // 2,048 x 512 gradient on 132 multiprocessors take 4 chunks (0.97 of the card busy);
        // 8 blocks of a 512 x 512 one 16 (0.97).
        assert_eq!(chunks(50_432, 32.0 / 132.0), 4);
        assert_eq!(chunks(50_432, 8.0 / 132.0), 16);
        // Half a wave: two chunks fill it.
        assert_eq!(chunks(50_432, 0.5), 2);
        // The encoder (k = 12,800 = 2^9 x 25): 18 blocks of 768 x 768 need 7.3 chunks; 7
        // does not divide k, 8 takes 2 waves at 0.55 busy, 20 gives 2.7 waves at 0.91.
        assert_eq!(chunks(12_800, 18.0 / 132.0), 20);
    }

    #[test]
    fn chunks_divide_k_and_keep_their_rows() {
        for k in [1_000, 4_096, 12_800, 25_216, 50_432, 65_537] {
            for waves in [0.01, 0.06, 0.13, 0.24, 0.41, 0.6, 0.9] {
                let s = chunks(k, waves);
                assert!(
                    (1..=MAX_CHUNKS).contains(&s) && k % s == 0,
                    "k {k} waves {waves}: {s}"
                );
                if s > 1 {
                    assert!(k / s >= MIN_CHUNK_ROWS, "k {k} waves {waves}: {s}");
                    assert_eq!((k / s) % CHUNK_ROWS_MULTIPLE, 0, "k {k} waves {waves}: {s}");
                    assert!(busy(s, waves) >= GAIN * waves, "k {k} waves {waves}: {s}");
                }
            }
        }
        // A prime k has no chunks; one too short for two chunks neither; nor one whose
        // chunks would be odd (1,030 = 2 x 515).
        assert_eq!(chunks(65_537, 0.1), 1);
        assert_eq!(chunks(1_000, 0.1), 1);
        assert_eq!(chunks(1_030, 0.1), 1);
    }

    #[test]
    fn tuning_tries_the_estimate_first_then_whole_and_powers_of_two() {
        assert_eq!(
            tuning_candidates(12_800, 18.0 / 132.0),
            vec![20, 1, 2, 4, 8, 16]
        );
        assert_eq!(
            tuning_candidates(50_432, 8.0 / 132.0),
            vec![16, 1, 2, 4, 8, 32]
        );
        assert_eq!(tuning_candidates(50_432, 2.0), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(tuning_candidates(1_000, 0.1), vec![1]);
    }

    #[test]
    fn nearly_full_waves_are_not_split_for_little() {
        // 0.9 of a wave: two chunks take 1.8 waves, 0.9 busy, not 1.25 times better.
        assert_eq!(chunks(50_432, 0.9), 1);
    }

    #[test]
    fn the_choice_parses_and_refuses_unknown_values() {
        assert_eq!(WeightGradSplit::parse("auto"), Ok(WeightGradSplit::Auto));
        assert_eq!(WeightGradSplit::parse("off"), Ok(WeightGradSplit::Off));
        assert!(WeightGradSplit::parse("on").is_err());
    }
}
