// Fused multi-head self-attention over timm's qkv layout (mae::backend::Backend::attention_*),
// flash-attention style: no [tokens, tokens] score matrix in memory. The algorithm of the CUDA
// backend's kernels/attention.cu.
//
// Layout: qkv [batch * tokens, 3 D], D = heads * HD, head h of q, k, v at columns h HD,
// D + h HD, 2 D + h HD; out and d_out [batch * tokens, D]; lse and drow [batch, heads, tokens].
// Scores are scale * (q . k), the scale applied after the product as timm does.
//
// One invocation owns one row: a query row (forward, dQ) or a key row (dK, dV), with its
// accumulators in private arrays of vec4 (four columns each), and walks every row of the other
// kind in ascending order, so each sum has a fixed order and no atomics are needed. A workgroup
// takes ATT_WG consecutive rows of one (image, head): workgroup (x, y) is rows x ATT_WG .. of
// pair y = image * heads + head. The rows it walks are read straight from the storage buffers
// at addresses that depend only on the workgroup and the loop counter, the same for every
// invocation of the workgroup (a broadcast load, served from one cache line on a GPU), with no
// workgroup memory and no barrier. On lavapipe these kernels measured 2 to 3 times slower than
// the composed ops, which the backend therefore uses there (attention.rs).
//
// HD (the head width, 1 to 64) and ATT_WG are pipeline constants, so the loops over a row's
// columns have a constant trip count; a dot product sums four partial sums (hsum) at the end.

override HD: u32 = 64u;
override ATT_WG: u32 = 64u;
// Groups of four columns: at most 16, the last one zero past HD.
const MAX_HD4: u32 = 16u;
override HD4: u32 = (HD + 3u) / 4u;
// Keys per step of the forward's online softmax: the running maximum and sum are rescaled once
// per step, not once per key.
const KEY_STEP: u32 = 32u;
// The lowest finite f32: the running maximum before any score, exp(LOWEST - s) is 0.
const LOWEST: f32 = -3.40282347e38;

struct AttParams {
    batch: u32,
    tokens: u32,
    heads: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> ap: AttParams;

// Where one (image, head) pair's rows start.
struct Pair {
    // Index of the pair, image * heads + head: the row of lse and drow.
    index: u32,
    // Token row of the image's first token.
    row0: u32,
    // Column of the head within q, out, d_out (add D for k, 2 D for v).
    col: u32,
}

fn pair_of(y: u32) -> Pair {
    let image = y / ap.heads;
    let head = y % ap.heads;
    return Pair(y, image * ap.tokens, head * HD);
}

// The sum of a dot product's four partial sums, in a fixed order.
fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// ---- forward --------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> fw_qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> fw_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> fw_lse: array<f32>;

// Columns 4 c4 .. 4 c4 + 3 of a row starting at `at`, zero past HD.
fn fw_load4(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = fw_qkv[at + 4u * c4 + e];
        }
    }
    return v;
}

// out_i = sum_j softmax_j(scale q_i . k_j) v_j with an online softmax: per step of KEY_STEP keys
// the invocation computes their scores, rescales its running sum and output once to the new
// maximum, then adds the step's terms. lse_i = max + log(sum).
@compute @workgroup_size(ATT_WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = wg.x * ATT_WG + lid;
    if i >= ap.tokens {
        return;
    }
    let pr = pair_of(wg.y);
    let dim = ap.heads * HD;
    let width = 3u * dim;
    let base = pr.row0 * width + pr.col;
    var q: array<vec4<f32>, MAX_HD4>;
    var o: array<vec4<f32>, MAX_HD4>;
    for (var c = 0u; c < HD4; c++) {
        q[c] = fw_load4(base + i * width, c);
        o[c] = vec4<f32>(0.0);
    }
    var m = LOWEST;
    var l = 0.0;
    var s: array<f32, KEY_STEP>;
    for (var j0 = 0u; j0 < ap.tokens; j0 += KEY_STEP) {
        let n = min(KEY_STEP, ap.tokens - j0);
        var step_max = LOWEST;
        for (var jj = 0u; jj < n; jj++) {
            let k_at = base + dim + (j0 + jj) * width;
            var d = vec4<f32>(0.0);
            for (var c = 0u; c < HD4; c++) {
                d += q[c] * fw_load4(k_at, c);
            }
            s[jj] = ap.scale * hsum(d);
            step_max = max(step_max, s[jj]);
        }
        if step_max > m {
            // exp(LOWEST - step_max) = 0 on the first step, where l and o are still 0.
            let corr = exp(m - step_max);
            l *= corr;
            for (var c = 0u; c < HD4; c++) {
                o[c] *= corr;
            }
            m = step_max;
        }
        for (var jj = 0u; jj < n; jj++) {
            let e = exp(s[jj] - m);
            l += e;
            let v_at = base + 2u * dim + (j0 + jj) * width;
            for (var c = 0u; c < HD4; c++) {
                o[c] += e * fw_load4(v_at, c);
            }
        }
    }
    let out_at = (pr.row0 + i) * dim + pr.col;
    for (var c = 0u; c < HD4; c++) {
        for (var e = 0u; e < 4u; e++) {
            if 4u * c + e < HD {
                fw_out[out_at + 4u * c + e] = o[c][e] / l;
            }
        }
    }
    fw_lse[pr.index * ap.tokens + i] = m + log(l);
}

// ---- backward: dQ ---------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> dq_qkv: array<f32>;
@group(0) @binding(2) var<storage, read> dq_out: array<f32>;
@group(0) @binding(3) var<storage, read> dq_lse: array<f32>;
@group(0) @binding(4) var<storage, read> dq_dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> dq_dqkv: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq_drow: array<f32>;

// As fw_load4, from qkv, out and d_out.
fn dq_load4_qkv(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = dq_qkv[at + 4u * c4 + e];
        }
    }
    return v;
}

fn dq_load4_out(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = dq_out[at + 4u * c4 + e];
        }
    }
    return v;
}

fn dq_load4_dout(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = dq_dout[at + 4u * c4 + e];
        }
    }
    return v;
}

// One invocation per query row i: drow_i = dO_i . O_i (the softmax backward's row sum), then
// over the keys p = exp(scale q_i . k_j - lse_i), ds = p (dO_i . v_j - drow_i), dq += ds k_j;
// dq is scaled once at the end. Overwrites the q columns of d_qkv, and drow for the dK, dV pass.
@compute @workgroup_size(ATT_WG)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = wg.x * ATT_WG + lid;
    if i >= ap.tokens {
        return;
    }
    let pr = pair_of(wg.y);
    let dim = ap.heads * HD;
    let width = 3u * dim;
    let base = pr.row0 * width + pr.col;
    let row_at = (pr.row0 + i) * dim + pr.col;
    var q: array<vec4<f32>, MAX_HD4>;
    var dout: array<vec4<f32>, MAX_HD4>;
    var dq: array<vec4<f32>, MAX_HD4>;
    var d4 = vec4<f32>(0.0);
    for (var c = 0u; c < HD4; c++) {
        q[c] = dq_load4_qkv(base + i * width, c);
        dout[c] = dq_load4_dout(row_at, c);
        d4 += dout[c] * dq_load4_out(row_at, c);
        dq[c] = vec4<f32>(0.0);
    }
    let d = hsum(d4);
    let li = dq_lse[pr.index * ap.tokens + i];
    for (var j = 0u; j < ap.tokens; j++) {
        let k_at = base + dim + j * width;
        let v_at = k_at + dim;
        var qk = vec4<f32>(0.0);
        var dv = vec4<f32>(0.0);
        for (var c = 0u; c < HD4; c++) {
            qk += q[c] * dq_load4_qkv(k_at, c);
            dv += dout[c] * dq_load4_qkv(v_at, c);
        }
        let prob = exp(ap.scale * hsum(qk) - li);
        let ds = prob * (hsum(dv) - d);
        for (var c = 0u; c < HD4; c++) {
            dq[c] += ds * dq_load4_qkv(k_at, c);
        }
    }
    let dq_at = (pr.row0 + i) * width + pr.col;
    for (var c = 0u; c < HD4; c++) {
        for (var e = 0u; e < 4u; e++) {
            if 4u * c + e < HD {
                dq_dqkv[dq_at + 4u * c + e] = ap.scale * dq[c][e];
            }
        }
    }
    dq_drow[pr.index * ap.tokens + i] = d;
}

// ---- backward: dK, dV -----------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> kv_qkv: array<f32>;
@group(0) @binding(2) var<storage, read> kv_lse: array<f32>;
@group(0) @binding(3) var<storage, read> kv_dout: array<f32>;
@group(0) @binding(4) var<storage, read> kv_drow: array<f32>;
@group(0) @binding(5) var<storage, read_write> kv_dqkv: array<f32>;

// As fw_load4, from qkv and d_out.
fn kv_load4_qkv(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = kv_qkv[at + 4u * c4 + e];
        }
    }
    return v;
}

fn kv_load4_dout(at: u32, c4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if 4u * c4 + e < HD {
            v[e] = kv_dout[at + 4u * c4 + e];
        }
    }
    return v;
}

// One invocation per key row j: over the queries, p = exp(scale q_i . k_j - lse_i) as in the dQ
// pass, dv += p dO_i, ds = p (dO_i . v_j - drow_i), dk += ds q_i; dk is scaled once at the end.
// Overwrites the k and v columns of d_qkv.
@compute @workgroup_size(ATT_WG)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let j = wg.x * ATT_WG + lid;
    if j >= ap.tokens {
        return;
    }
    let pr = pair_of(wg.y);
    let dim = ap.heads * HD;
    let width = 3u * dim;
    let base = pr.row0 * width + pr.col;
    var k: array<vec4<f32>, MAX_HD4>;
    var v: array<vec4<f32>, MAX_HD4>;
    var dk: array<vec4<f32>, MAX_HD4>;
    var dv: array<vec4<f32>, MAX_HD4>;
    for (var c = 0u; c < HD4; c++) {
        k[c] = kv_load4_qkv(base + dim + j * width, c);
        v[c] = kv_load4_qkv(base + 2u * dim + j * width, c);
        dk[c] = vec4<f32>(0.0);
        dv[c] = vec4<f32>(0.0);
    }
    let lrow = pr.index * ap.tokens;
    for (var i = 0u; i < ap.tokens; i++) {
        let q_at = base + i * width;
        let o_at = (pr.row0 + i) * dim + pr.col;
        var qk = vec4<f32>(0.0);
        var dov = vec4<f32>(0.0);
        for (var c = 0u; c < HD4; c++) {
            qk += kv_load4_qkv(q_at, c) * k[c];
            dov += kv_load4_dout(o_at, c) * v[c];
        }
        let prob = exp(ap.scale * hsum(qk) - kv_lse[lrow + i]);
        let ds = prob * (hsum(dov) - kv_drow[lrow + i]);
        for (var c = 0u; c < HD4; c++) {
            dv[c] += prob * kv_load4_dout(o_at, c);
            dk[c] += ds * kv_load4_qkv(q_at, c);
        }
    }
    let at = (pr.row0 + j) * width + dim + pr.col;
    for (var c = 0u; c < HD4; c++) {
        for (var e = 0u; e < 4u; e++) {
            if 4u * c + e < HD {
                kv_dqkv[at + 4u * c + e] = ap.scale * dk[c][e];
                kv_dqkv[at + dim + 4u * c + e] = dv[c][e];
            }
        }
    }
}
