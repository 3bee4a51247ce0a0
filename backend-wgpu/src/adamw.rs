//! AdamW (`shaders/adamw.wgsl`).

use crate::kernel::{grid_1d, word, Kernel};
use crate::{Buf, WgpuBackend};
use mae::backend::{AdamWStep, BResult};

pub(crate) fn adamw(
    be: &WgpuBackend,
    param: &mut Buf,
    grad: &Buf,
    m: &mut Buf,
    v: &mut Buf,
    s: &AdamWStep,
) -> BResult<()> {
    let n = param.len();
    debug_assert!(grad.len() >= n && m.len() >= n && v.len() >= n);
    let params = [
        word(n)?,
        s.lr.to_bits(),
        s.beta1.to_bits(),
        s.beta2.to_bits(),
        s.eps.to_bits(),
        s.weight_decay.to_bits(),
        s.bias_correction1.to_bits(),
        s.bias_correction2.to_bits(),
    ];
    be.launch(
        Kernel::AdamW,
        &params,
        &[&param.raw, &grad.raw, &m.raw, &v.raw],
        grid_1d(n),
    )
}
