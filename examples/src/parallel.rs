//! Data-parallel pre-training, one process (rank) per GPU: what each rank does per micro-batch.
//!
//! A job of `n` ranks at `b` images per rank trains like one process at the global batch
//! `n * b`, with the same images, augmentations and masks:
//! - data: every rank's loader builds its [`Shard`](crate::data::Shard) of the global batch
//!   (samples `r * b .. (r + 1) * b`), each sample with the generator it has in the whole batch;
//! - masking: every rank draws the noise of the whole global batch from one generator, the same
//!   on every rank, and keeps its own rows ([`Replica`]), so the masks do not depend on the rank
//!   count either, and one generator state in the checkpoint resumes every rank exactly;
//! - gradients: each rank's loss is the mean over its `b` images, so the mean of the ranks'
//!   gradients ([`GradAverager`], NCCL's average all-reduce on GPUs) is the global batch's
//!   gradient, up to the order of the floating-point sums. The last micro-batch's backward hands
//!   the averager each group of gradients as soon as it is final ([`GradsReady`]), so the
//!   averaging of the decoder's gradients runs while the encoder's are computed;
//! - every rank starts from the same initialization (drawn from the run's seed) and applies the
//!   same averaged update, so the replicas stay identical without broadcasts.

use mae::backend::{Backend, BackendError};
use mae::masking::sample_noise;
use mae::model::GradsReady;
use mae::params::MaeParams;
use mae::rng::Rng;
use mae::train::Trainer;

/// Replaces a rank's gradients by their mean over all ranks. The backward of an update's last
/// micro-batch hands it every gradient as soon as that gradient is final (the [`GradsReady`]
/// supertrait), and it may start averaging those right away; [`GradAverager::finish`] then
/// completes the averaging before the update reads the gradients.
pub trait GradAverager<B: Backend>: GradsReady<B> {
    /// Completes the averaging of `grads` (in parameter order) across the ranks, in place: the
    /// update that follows reads the means. Every rank calls it at the same point of the same
    /// step.
    fn finish(&mut self, b: &B, grads: &mut MaeParams<B::Buf>) -> Result<(), BackendError>;
}

/// A job of one rank: its gradients are already the mean.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alone;

impl<B: Backend> GradsReady<B> for Alone {
    fn ready(&mut self, _: &B, _: &mut [&mut B::Buf]) -> Result<(), BackendError> {
        Ok(())
    }
}

impl<B: Backend> GradAverager<B> for Alone {
    fn finish(&mut self, _: &B, _: &mut MaeParams<B::Buf>) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl GradAverager<mae_backend_cuda::CudaBackend> for mae_backend_cuda::nccl::DataParallel {
    fn finish(
        &mut self,
        _: &mae_backend_cuda::CudaBackend,
        grads: &mut MaeParams<mae_backend_cuda::CudaBuf>,
    ) -> Result<(), BackendError> {
        self.finish_mean(grads.tensors_mut())
    }
}

/// A process's place in a data-parallel job and how it averages gradients with the others.
pub struct Rank<'a, B: Backend> {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Processes in the job.
    pub world_size: usize,
    /// The gradient averaging across the job.
    pub averager: &'a mut dyn GradAverager<B>,
}

/// One rank's part of a data-parallel run: the shared masking generator and the gradient
/// averaging around a [`Trainer`] built for the rank's batch.
pub struct Replica<'a, B: Backend> {
    rank: usize,
    world_size: usize,
    masking: Rng,
    noise: Vec<f32>,
    averager: &'a mut dyn GradAverager<B>,
}

impl<'a, B: Backend> Replica<'a, B> {
    /// The replica of `rank`, drawing masks from a generator in state `masking_state` (the
    /// same on every rank: the seed a single process would give its trainer, or the state saved
    /// in a checkpoint).
    pub fn new(rank: Rank<'a, B>, masking_state: u64) -> Replica<'a, B> {
        Replica {
            rank: rank.rank,
            world_size: rank.world_size,
            masking: Rng::new(masking_state),
            noise: Vec::new(),
            averager: rank.averager,
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the job.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The masking generator's state, the same on every rank (for checkpoints).
    pub fn masking_state(&self) -> u64 {
        self.masking.state()
    }

    /// One micro-batch: forward and backward on this rank's `imgs` with its rows of the global
    /// batch's masking noise; at the accumulation boundary, the gradients averaged across ranks
    /// and one update at `lr`. Returns this rank's loss. A process that trains alone with
    /// [`Alone`] gets bitwise what [`Trainer::train_step`] gives.
    pub fn step(
        &mut self,
        trainer: &mut Trainer<B>,
        b: &B,
        imgs: &[f32],
        lr: f64,
    ) -> mae::Result<f32> {
        let opts = *trainer.options();
        let grid = trainer.config().grid_size();
        let per_rank = opts.batch_size * grid * grid;
        self.noise.resize(per_rank * self.world_size, 0.0);
        sample_noise(
            opts.mask_sampling,
            grid,
            opts.mask_ratio,
            &mut self.masking,
            &mut self.noise,
        )?;
        let mine = &self.noise[self.rank * per_rank..][..per_rank];
        if trainer.pending() + 1 < opts.accum_steps {
            return trainer.forward_backward(b, imgs, Some(mine));
        }
        let loss = trainer.forward_backward_reporting(b, imgs, Some(mine), self.averager)?;
        self.averager.finish(b, trainer.grads_mut())?;
        trainer.update(b, lr)?;
        Ok(loss)
    }
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use super::*;
    use mae::train::TrainOptions;
    use mae_backend_cpu::CpuBackend;

    /// One rank with [`Alone`] is the single-process step, bit for bit, through two
    /// accumulation boundaries.
    #[test]
    fn one_rank_alone_is_the_single_process_run() {
        let b = CpuBackend::new();
        let cfg = mae::Config::preset("tiny32").unwrap();
        let params = mae::init::init_params(&cfg, 5);
        let mut opts = TrainOptions::new(2);
        opts.accum_steps = 2;
        let seed = 99;
        let mut single = Trainer::new(&b, &cfg, &params, opts, seed).unwrap();
        let mut replica_trainer = Trainer::new(&b, &cfg, &params, opts, seed).unwrap();
        let mut alone = Alone;
        let rank = Rank {
            rank: 0,
            world_size: 1,
            averager: &mut alone,
        };
        let mut replica = Replica::new(rank, seed);
        for k in 0..4 {
            let imgs: Vec<f32> = (0..2 * 3 * 32 * 32)
                .map(|i| ((i * 31 + k * 7) % 97) as f32 / 50.0 - 1.0)
                .collect();
            let a = single.train_step(&b, &imgs, None, 1e-3).unwrap();
            let r = replica.step(&mut replica_trainer, &b, &imgs, 1e-3).unwrap();
            assert_eq!(a.to_bits(), r.to_bits(), "loss of micro-batch {k}");
        }
        assert_eq!(replica_trainer.updates(), 2);
        let s = single.state(&b).unwrap();
        let r = replica_trainer.state(&b).unwrap();
        assert!(s.params == r.params && s.m == r.m && s.v == r.v);
        assert_eq!(s.rng_state, replica.masking_state());
    }
}
