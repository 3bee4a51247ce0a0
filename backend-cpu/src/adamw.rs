//! AdamW with PyTorch's `torch.optim.AdamW` (single-tensor path) semantics.

use crate::pool::GRAIN;
use mae::backend::AdamWStep;

/// The per-step scalars are formed in `f32` from the `f32` fields of [`AdamWStep`], as a GPU
/// kernel given the same struct would. Per element, in PyTorch's order: decoupled decay
/// `p *= 1 - lr * wd`, the moment updates `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// then `p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`.
pub(crate) fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let n = param.len();
    let (grad, m, v) = (&grad[..n], &mut m[..n], &mut v[..n]);
    let k = Scalars::of(s);
    crate::pool::chunks3(
        n.div_ceil(GRAIN),
        (param, GRAIN),
        (m, GRAIN),
        (v, GRAIN),
        |i, pc, mc, vc| {
            crate::fastmath::wide(
                #[inline(always)]
                || k.update(pc, &grad[i * GRAIN..i * GRAIN + pc.len()], mc, vc),
            )
        },
    );
}

/// [`adamw`], then `grad = 0`, chunk by chunk: each gradient chunk is zeroed while it is still
/// in cache from the update, which saves the separate pass over every gradient that a step's
/// `fill` was (the CPU's `adamw_many`).
pub(crate) fn adamw_then_zero_grad(
    param: &mut [f32],
    grad: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) {
    let n = param.len();
    let (grad, m, v) = (&mut grad[..n], &mut m[..n], &mut v[..n]);
    let k = Scalars::of(s);
    crate::pool::zip_chunks(
        n.div_ceil(GRAIN),
        [(param, GRAIN), (grad, GRAIN), (m, GRAIN), (v, GRAIN)],
        |_, [pc, gc, mc, vc]| {
            crate::fastmath::wide(
                #[inline(always)]
                || {
                    k.update(pc, gc, mc, vc);
                    gc.fill(0.0);
                },
            )
        },
    );
}

/// The per-step scalars of one tensor's update.
struct Scalars {
    decay: f32,
    b1: f32,
    b2: f32,
    one_minus_b1: f32,
    one_minus_b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl Scalars {
    fn of(s: &AdamWStep) -> Scalars {
        Scalars {
            decay: 1.0 - s.lr * s.weight_decay,
            b1: s.beta1,
            b2: s.beta2,
            one_minus_b1: 1.0 - s.beta1,
            one_minus_b2: 1.0 - s.beta2,
            step_size: s.lr / s.bias_correction1,
            bc2_sqrt: s.bias_correction2.sqrt(),
            eps: s.eps,
        }
    }

    /// The update of one chunk (all four of one length). Callers run it inside
    /// [`crate::fastmath::wide`]: eight-wide square roots and divisions, and the same bits, as
    /// every operation is a correctly rounded IEEE one (no FMA contraction).
    #[inline(always)]
    fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= self.decay;
            *m = self.b1 * *m + self.one_minus_b1 * g;
            *v = self.b2 * *v + self.one_minus_b2 * g * g;
            *p -= self.step_size * *m / (v.sqrt() / self.bc2_sqrt + self.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::{AdamWStep, Backend};

    /// Two AdamW steps in f64 from the textbook formulas.
    #[test]
    fn two_steps_match_f64_reference() {
        let be = be();
        let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.95, 1e-8, 0.05);
        let p0 = [1.0f32, -2.0, 0.5, 0.0];
        let grads = [[0.1f32, -0.3, 0.0, 2.0], [-0.2, 0.1, 0.05, 1.0]];
        let (mut p, mut m, mut v) = (up(&p0), be.alloc(4).unwrap(), be.alloc(4).unwrap());
        let (mut rp, mut rm, mut rv) = (f64s(&p0), vec![0.0f64; 4], vec![0.0f64; 4]);
        for (t, g) in grads.iter().enumerate() {
            let step = AdamWStep::new(lr, b1, b2, eps, wd, t as u64 + 1);
            be.adamw(&mut p, &up(g), &mut m, &mut v, &step).unwrap();
            let (bc1, bc2) = (1.0 - b1.powi(t as i32 + 1), 1.0 - b2.powi(t as i32 + 1));
            for i in 0..4 {
                let g = g[i] as f64;
                rp[i] -= lr * wd * rp[i];
                rm[i] = b1 * rm[i] + (1.0 - b1) * g;
                rv[i] = b2 * rv[i] + (1.0 - b2) * g * g;
                rp[i] -= lr / bc1 * rm[i] / (rv[i].sqrt() / bc2.sqrt() + eps);
            }
        }
        assert_close(&p, &f32s(&rp), 1e-6);
        assert_close(&m, &f32s(&rm), 1e-6);
        assert_close(&v, &f32s(&rv), 1e-6);
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr_against_its_gradient() {
        // At t = 1 the bias-corrected ratio m / sqrt(v) is sign(g), so each weight moves by lr.
        let be = be();
        let mut p = up(&[1.0, 1.0, 1.0]);
        let (mut m, mut v) = (be.alloc(3).unwrap(), be.alloc(3).unwrap());
        let step = AdamWStep::new(0.1, 0.9, 0.999, 1e-8, 0.0, 1);
        be.adamw(&mut p, &up(&[3.0, -0.01, 0.0]), &mut m, &mut v, &step)
            .unwrap();
        assert_close(&p, &[0.9, 1.1, 1.0], 1e-6);
    }

    #[test]
    fn weight_decay_alone_shrinks_by_lr_times_wd() {
        let be = be();
        let mut p = up(&[2.0, -4.0]);
        let (mut m, mut v) = (be.alloc(2).unwrap(), be.alloc(2).unwrap());
        let step = AdamWStep::new(0.1, 0.9, 0.999, 1e-8, 0.5, 1);
        be.adamw(&mut p, &up(&[0.0, 0.0]), &mut m, &mut v, &step)
            .unwrap();
        assert_eq!(p, [2.0 * 0.95, -4.0 * 0.95]);
        assert_eq!(m, [0.0, 0.0]);
    }
}
