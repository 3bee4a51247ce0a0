// Row movement: row maps, index gathers, patchify and the attention-head views. One invocation
// per element moved. Pure moves go through u32 bindings, so values are copied bit for bit
// (denormals, NaN payloads); accumulating variants reinterpret the bits as f32.

// ---- copy_rows / copy_rows_backward (mae::backend::RowMap) ----------------------------------

struct MapParams {
    batch: u32,
    count: u32,
    cols: u32,
    src_stride: u32,
    src_start: u32,
    src_step: u32,
    dst_stride: u32,
    dst_start: u32,
    // copy_rows: 1 to accumulate. copy_rows_backward: number of source rows.
    extra: u32,
}

@group(0) @binding(0) var<uniform> map: MapParams;
@group(0) @binding(1) var<storage, read> map_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> map_dst: array<u32>;

@compute @workgroup_size(WG)
fn copy_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= map.batch * map.count * map.cols {
        return;
    }
    let col = e % map.cols;
    let pair = e / map.cols;
    let i = pair % map.count;
    let b = pair / map.count;
    let s = (b * map.src_stride + map.src_start + i * map.src_step) * map.cols + col;
    let d = (b * map.dst_stride + map.dst_start + i) * map.cols + col;
    if map.extra != 0u {
        map_dst[d] = bitcast<u32>(bitcast<f32>(map_dst[d]) + bitcast<f32>(map_src[s]));
    } else {
        map_dst[d] = map_src[s];
    }
}

// One invocation per source element: it sums the destination elements its row was copied to,
// over the pairs (b, i) in ascending order, and adds the sum once. Rows nobody read are left
// exactly as they were.
@compute @workgroup_size(WG)
fn copy_rows_backward(@builtin(workgroup_id) wg: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= map.extra * map.cols {
        return;
    }
    let col = e % map.cols;
    let s = e / map.cols;
    var acc = sum_new();
    var read = false;
    for (var b = 0u; b < map.batch; b++) {
        let first = b * map.src_stride + map.src_start;
        if s < first {
            // Later items start no earlier: strides are non-negative.
            break;
        }
        let offset = s - first;
        if map.src_step == 0u {
            if offset == 0u {
                read = true;
                for (var i = 0u; i < map.count; i++) {
                    let d = (b * map.dst_stride + map.dst_start + i) * map.cols + col;
                    acc = sum_add(acc, bitcast<f32>(map_src[d]));
                }
            }
        } else if offset % map.src_step == 0u && offset / map.src_step < map.count {
            read = true;
            let i = offset / map.src_step;
            let d = (b * map.dst_stride + map.dst_start + i) * map.cols + col;
            acc = sum_add(acc, bitcast<f32>(map_src[d]));
        }
    }
    if read {
        map_dst[e] = bitcast<u32>(bitcast<f32>(map_dst[e]) + sum_value(acc));
    }
}

// ---- gather_rows / gather_rows_backward (mae::backend::Gather) ------------------------------

struct GatherParams {
    batch: u32,
    count: u32,
    cols: u32,
    src_rows: u32,
    src_stride: u32,
    src_start: u32,
    dst_rows: u32,
    dst_start: u32,
}

@group(0) @binding(0) var<uniform> gat: GatherParams;
@group(0) @binding(1) var<storage, read> gat_src: array<u32>;
@group(0) @binding(2) var<storage, read> gat_idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> gat_dst: array<u32>;

// For element e of the gathered rows: (source element, destination element), or a source
// index past the rows when the index is out of range (never for mae's permutations).
fn gather_pair(e: u32) -> vec2<u32> {
    let col = e % gat.cols;
    let pair = e / gat.cols;
    let j = pair % gat.count;
    let b = pair / gat.count;
    let k = gat_idx[b * gat.count + j];
    let s = (b * gat.src_stride + gat.src_start + k) * gat.cols + col;
    let d = (b * gat.dst_rows + gat.dst_start + j) * gat.cols + col;
    return vec2<u32>(select(0xffffffffu, s, k < gat.src_rows), d);
}

@compute @workgroup_size(WG)
fn gather_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= gat.batch * gat.count * gat.cols {
        return;
    }
    let sd = gather_pair(e);
    if sd.x != 0xffffffffu {
        gat_dst[sd.y] = gat_src[sd.x];
    }
}

// Indices of one item are distinct, so each source row receives at most one row: no races.
// Here binding 1 is d_dst (read) and binding 3 is d_src (accumulated).
@compute @workgroup_size(WG)
fn gather_rows_backward(@builtin(workgroup_id) wg: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= gat.batch * gat.count * gat.cols {
        return;
    }
    let sd = gather_pair(e);
    if sd.x != 0xffffffffu {
        gat_dst[sd.x] = bitcast<u32>(bitcast<f32>(gat_dst[sd.x]) + bitcast<f32>(gat_src[sd.y]));
    }
}

// ---- patchify (mae::backend::Patchify) --------------------------------------------------------

struct PatchParams {
    // batch * patches per image * values per patch: the invocations.
    total: u32,
    channels: u32,
    height: u32,
    width: u32,
    size: u32,
    // 0: (c, y, x) order, 1: (y, x, c) order.
    hwc: u32,
}

@group(0) @binding(0) var<uniform> pat: PatchParams;
@group(0) @binding(1) var<storage, read> pat_img: array<u32>;
@group(0) @binding(2) var<storage, read_write> pat_out: array<u32>;

@compute @workgroup_size(WG)
fn patchify(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let o = flat_id(wg, nwg, lid);
    if o >= pat.total {
        return;
    }
    let ps = pat.size;
    let gw = pat.width / ps;
    let num = (pat.height / ps) * gw;
    let plen = ps * ps * pat.channels;
    let b = o / (num * plen);
    let l = (o / plen) % num;
    let e = o % plen;
    var c: u32;
    var py: u32;
    var px: u32;
    if pat.hwc != 0u {
        py = e / (ps * pat.channels);
        px = (e / pat.channels) % ps;
        c = e % pat.channels;
    } else {
        c = e / (ps * ps);
        py = (e / ps) % ps;
        px = e % ps;
    }
    let y = (l / gw) * ps + py;
    let x = (l % gw) * ps + px;
    pat_out[o] = pat_img[((b * pat.channels + c) * pat.height + y) * pat.width + x];
}

// ---- split_heads / merge_heads (mae::backend::Heads) ----------------------------------------

struct HeadParams {
    batch: u32,
    tokens: u32,
    heads: u32,
    head_dim: u32,
    row_width: u32,
    col_offset: u32,
}

@group(0) @binding(0) var<uniform> hp: HeadParams;
@group(0) @binding(1) var<storage, read> head_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> head_dst: array<u32>;

// (token-matrix element, per-head element) of per-head element e.
fn head_pair(e: u32) -> vec2<u32> {
    let j = e % hp.head_dim;
    let t = (e / hp.head_dim) % hp.tokens;
    let h = (e / (hp.head_dim * hp.tokens)) % hp.heads;
    let b = e / (hp.head_dim * hp.tokens * hp.heads);
    let x = (b * hp.tokens + t) * hp.row_width + hp.col_offset + h * hp.head_dim + j;
    return vec2<u32>(x, e);
}

@compute @workgroup_size(WG)
fn split_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= hp.batch * hp.heads * hp.tokens * hp.head_dim {
        return;
    }
    let xh = head_pair(e);
    head_dst[xh.y] = head_src[xh.x];
}

@compute @workgroup_size(WG)
fn merge_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= hp.batch * hp.heads * hp.tokens * hp.head_dim {
        return;
    }
    let xh = head_pair(e);
    head_dst[xh.x] = head_src[xh.y];
}
