// Shared by every kernel file (prepended to each when its module is built).

// Invocations per workgroup of the 1-D kernels (kernel.rs `WG`).
const WG: u32 = 256u;

// The flat index of an invocation of a 1-D launch, whose workgroups are folded into a 2-D grid
// because each grid dimension holds at most 65535 of them (kernel.rs `grid_1d`).
fn flat_id(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid;
}

// Compensated (Kahan-Babuska-Neumaier) summation: the reductions run in f32 on the device, and
// this keeps their error near one rounding instead of growing with the number of terms.
struct Sum {
    s: f32,
    c: f32,
}

fn sum_new() -> Sum {
    return Sum(0.0, 0.0);
}

fn sum_add(acc: Sum, x: f32) -> Sum {
    let t = acc.s + x;
    var c = acc.c;
    if abs(acc.s) >= abs(x) {
        c += (acc.s - t) + x;
    } else {
        c += (x - t) + acc.s;
    }
    return Sum(t, c);
}

fn sum_value(acc: Sum) -> f32 {
    return acc.s + acc.c;
}
