use mae::backend::*;
use mae_backend_cpu::CpuBackend;
use std::time::Instant;
fn t<F: FnMut()>(name: &str, elems: usize, mut f: F) {
    f();
    let n = 10;
    let s = Instant::now();
    for _ in 0..n { f(); }
    let dt = s.elapsed().as_secs_f64() / n as f64;
    println!("{name:30} {:8.3} ms  {:6.2} ns/elem", dt * 1e3, dt * 1e9 / elems as f64);
}
fn main() {
    let be = CpuBackend::new();
    let (rows, cols) = (3200usize, 192usize);
    let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32) / 500.0 - 1.0).collect();
    let x = be.upload(&x).unwrap();
    let g = be.upload(&vec![1.0; cols]).unwrap();
    let b = be.alloc(cols).unwrap();
    let mut y = be.alloc(rows * cols).unwrap();
    let mut mean = be.alloc(rows).unwrap();
    let mut rstd = be.alloc(rows).unwrap();
    let mut dx = be.alloc(rows * cols).unwrap();
    let mut dg = be.alloc(cols).unwrap();
    let mut db = be.alloc(cols).unwrap();
    t("layernorm_fwd 3200x192", rows * cols, || be.layernorm_forward(&x, &g, &b, &mut y, &mut mean, &mut rstd, rows, cols, 1e-6).unwrap());
    t("layernorm_bwd 3200x192", rows * cols, || be.layernorm_backward(&x, &x, &g, &mean, &rstd, &mut dx, &mut dg, &mut db, rows, cols).unwrap());
    t("softmax_fwd", rows * cols, || be.softmax_forward(&x, &mut y, rows * 3, 64, 0.125).unwrap());
    t("softmax_bwd", rows * cols, || be.softmax_backward(&x, &x, &mut dx, rows * 3, 64, 0.125).unwrap());
    t("gelu_fwd", rows * cols, || be.gelu_forward(&x, &mut y).unwrap());
    t("gelu_bwd", rows * cols, || be.gelu_backward(&x, &x, &mut dx).unwrap());
    t("bias bwd", rows * cols, || be.copy_rows_backward(&x, &mut dg, &RowMap::bias(rows, cols)).unwrap());
    t("bias fwd", rows * cols, || be.copy_rows(&g, &mut y, &RowMap::bias(rows, cols), true).unwrap());
    t("normalize_rows", rows * cols, || be.normalize_rows(&x, &mut y, rows, cols, 1e-6).unwrap());
    let mut loss = be.alloc(1).unwrap();
    t("mse fwd", rows * cols, || be.masked_mse_forward(&x, &y, &mean, &mut loss, rows, cols).unwrap());
    let (mut m, mut v, mut p) = (be.alloc(rows*cols).unwrap(), be.alloc(rows*cols).unwrap(), be.alloc(rows*cols).unwrap());
    let st = AdamWStep::new(1e-3, 0.9, 0.95, 1e-8, 0.05, 3);
    t("adamw", rows * cols, || be.adamw(&mut p, &x, &mut m, &mut v, &st).unwrap());
    let h = Heads { batch: 64, tokens: 50, heads: 3, head_dim: 64, row_width: 576, col_offset: 192 };
    let qkv = be.alloc(h.lens().0).unwrap();
    let mut hh = be.alloc(h.lens().1).unwrap();
    t("split_heads", h.lens().1, || be.split_heads(&qkv, &mut hh, &h).unwrap());
    let a = be.upload(&(0..3200*192).map(|i| (i % 17) as f32).collect::<Vec<_>>()).unwrap();
    let w = be.upload(&(0..576*192).map(|i| (i % 13) as f32 * 0.1).collect::<Vec<_>>()).unwrap();
    let mut c = be.alloc(3200*576).unwrap();
    let gm = Gemm::new(3200, 576, 192).trans_b();
    let s = Instant::now();
    for _ in 0..10 { be.gemm(&gm, &a, &w, &mut c).unwrap(); }
    let dt = s.elapsed().as_secs_f64() / 10.0;
    println!("gemm 3200x576x192: {:.2} ms, {:.1} GFLOP/s, checksum {}", dt*1e3, 2.0*3200.0*576.0*192.0/dt/1e9, c.iter().map(|&x| x as f64).sum::<f64>());
    let bits: u64 = c.iter().fold(0u64, |h, x| h.wrapping_mul(31).wrapping_add(x.to_bits() as u64));
    println!("gemm hash {bits}");
}
