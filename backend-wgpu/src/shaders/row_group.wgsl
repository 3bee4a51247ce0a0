// Helpers of the one-workgroup-per-row kernels (per_row.rs `RowKernel::Workgroup`), prepended to
// the files that have such kernels. A workgroup of ROW_WG invocations owns one row: invocation
// `lid` takes columns lid, lid + ROW_WG, ... (neighbouring invocations read neighbouring
// addresses), keeps a compensated partial sum of them, and the partials are combined by a tree
// in workgroup memory whose shape depends only on ROW_WG, so results are the same run to run.

// Invocations per workgroup (per_row.rs `ROW_WG`): two 32-wide warps or one 64-wide wave, and
// few idle invocations on rows of 50 to 768 values.
const ROW_WG: u32 = 64u;

var<workgroup> group_s: array<f32, ROW_WG>;
var<workgroup> group_c: array<f32, ROW_WG>;

// The row of this workgroup: the grid is folded in two dimensions as per_row.rs `grid_rows`
// folds it. Uniform across the workgroup, so a kernel may return early before its barriers.
fn group_row(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// The sum of every invocation's `part`, returned to all of them. Level by level, invocation i
// adds the partial of i + w to its own (w = ROW_WG / 2, ..., 1): a fixed order.
fn group_sum(lid: u32, part: Sum) -> Sum {
    group_s[lid] = part.s;
    group_c[lid] = part.c;
    workgroupBarrier();
    for (var w = ROW_WG / 2u; w > 0u; w /= 2u) {
        if lid < w {
            let acc = sum_add(Sum(group_s[lid], group_c[lid]), group_s[lid + w]);
            group_s[lid] = acc.s;
            group_c[lid] = acc.c + group_c[lid + w];
        }
        workgroupBarrier();
    }
    let total = Sum(group_s[0], group_c[0]);
    // Everyone has read the total before the next reduction overwrites it.
    workgroupBarrier();
    return total;
}

// The maximum of every invocation's `part`, returned to all of them.
fn group_max(lid: u32, part: f32) -> f32 {
    group_s[lid] = part;
    workgroupBarrier();
    for (var w = ROW_WG / 2u; w > 0u; w /= 2u) {
        if lid < w {
            group_s[lid] = max(group_s[lid], group_s[lid + w]);
        }
        workgroupBarrier();
    }
    let total = group_s[0];
    workgroupBarrier();
    return total;
}
