// Row movement: row maps, index gathers, patchify and the attention-head views. Each thread
// moves one element; consecutive threads touch consecutive columns, so accesses coalesce.

// A RowMap (see mae::backend::RowMap); strides and starts are in rows.
struct RowMap {
    u64 batch, count, cols, src_stride, src_start, src_step, dst_stride, dst_start;
};

__device__ RowMap row_map(u64 batch, u64 count, u64 cols, u64 src_stride, u64 src_start,
                          u64 src_step, u64 dst_stride, u64 dst_start) {
    RowMap m = {batch, count, cols, src_stride, src_start, src_step, dst_stride, dst_start};
    return m;
}

// Moves (or adds) one element or one group of four: `float4` moves four columns in one 16-byte
// access, a quarter of the memory instructions and of the index arithmetic per float.
__device__ __forceinline__ void put(float* d, float v, u32 accumulate) {
    *d = accumulate ? *d + v : v;
}
__device__ __forceinline__ void put(float4* d, float4 v, u32 accumulate) {
    if (accumulate) {
        const float4 o = *d;
        v = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
    }
    *d = v;
}

// Whether rows of `cols` floats in these buffers can move as float4: whole groups of four and
// 16-byte aligned bases (device allocations are 256-byte aligned; the check keeps any other
// pointer on the scalar path).
__device__ __forceinline__ bool in_fours(const void* a, const void* b, u64 cols) {
    return cols % 4 == 0 && (((u64)a | (u64)b) & 15) == 0;
}

// copy_rows over elements of type V, `cols` of them per row.
template <typename V>
__device__ void copy_rows_of(const V* src, V* dst, u64 batch, u64 count, u64 cols, u64 src_stride,
                             u64 src_start, u64 src_step, u64 dst_stride, u64 dst_start,
                             u32 accumulate) {
    const u64 n = batch * count * cols;
    FOR_EACH(e, n) {
        const u64 pair = div_u(e, cols), c = e - pair * cols;
        const u64 b = div_u(pair, count), i = pair - b * count;
        const V v = src[(b * src_stride + src_start + i * src_step) * cols + c];
        put(&dst[(b * dst_stride + dst_start + i) * cols + c], v, accumulate);
    }
}

extern "C" __global__ void copy_rows(const float* src, float* dst, u64 batch, u64 count,
                                     u64 cols, u64 src_stride, u64 src_start, u64 src_step,
                                     u64 dst_stride, u64 dst_start, u32 accumulate) {
    if (in_fours(src, dst, cols)) {
        copy_rows_of((const float4*)src, (float4*)dst, batch, count, cols / 4, src_stride,
                     src_start, src_step, dst_stride, dst_start, accumulate);
    } else {
        copy_rows_of(src, dst, batch, count, cols, src_stride, src_start, src_step, dst_stride,
                     dst_start, accumulate);
    }
}

// The pairs (b, i) that read source row `s`, in ascending (b, i) order: `*first_b`, and how
// many there are. For src_step 0 or 1 (the host refuses others). The k-th reader is
// `reader_dst_row(m, s, first_b, k)`.
__device__ u64 readers_of(const RowMap& m, u64 s, u64* first_b) {
    *first_b = 0;
    if (s < m.src_start) return 0;
    const u64 t = s - m.src_start;
    if (m.src_step == 0) {
        if (m.src_stride == 0) return t == 0 ? m.batch * m.count : 0;  // every pair
        if (mod_u(t, m.src_stride) != 0 || div_u(t, m.src_stride) >= m.batch) return 0;
        *first_b = div_u(t, m.src_stride);  // every i of one item
        return m.count;
    }
    // src_step 1: pair (b, i) reads row start + b * stride + i, so i = t - b * stride.
    if (m.src_stride == 0) return t < m.count ? m.batch : 0;  // one i, every item
    const u64 lo = t >= m.count ? div_u(t - m.count, m.src_stride) + 1 : 0;  // i < count
    u64 hi = div_u(t, m.src_stride);                                           // i >= 0
    if (hi > m.batch - 1) hi = m.batch - 1;
    *first_b = lo;
    return hi >= lo ? hi - lo + 1 : 0;
}

__device__ u64 reader_dst_row(const RowMap& m, u64 s, u64 first_b, u64 k) {
    u64 b, i;
    if (m.src_step == 0) {
        if (m.src_stride == 0) {
            b = div_u(k, m.count);
            i = mod_u(k, m.count);
        } else {
            b = first_b;
            i = k;
        }
    } else if (m.src_stride == 0) {
        b = k;
        i = s - m.src_start;
    } else {
        b = first_b + k;
        i = (s - m.src_start) - b * m.src_stride;
    }
    return b * m.dst_stride + m.dst_start + i;
}

// Pass 1 of copy_rows_backward: partial[chunk][s][c] = sum, in double and ascending order, of
// the d_dst rows of readers chunk * chunk_len ... (chunk + 1) * chunk_len - 1 of source row s.
// Chunks past a row's last reader are not written (pass 2 does not read them).
extern "C" __global__ void copy_rows_backward_partials(
    const float* d_dst, double* partial, u64 batch, u64 count, u64 cols, u64 src_stride,
    u64 src_start, u64 src_step, u64 dst_stride, u64 dst_start, u64 src_rows, u64 chunks,
    u64 chunk_len) {
    const RowMap m = row_map(batch, count, cols, src_stride, src_start, src_step, dst_stride,
                             dst_start);
    const u64 n = chunks * src_rows * cols;
    FOR_EACH(e, n) {
        const u64 c = mod_u(e, cols);
        const u64 s = mod_u(div_u(e, cols), src_rows);
        const u64 chunk = div_u(e, cols * src_rows);
        u64 first_b;
        const u64 readers = readers_of(m, s, &first_b);
        const u64 k0 = chunk * chunk_len;
        if (k0 >= readers) continue;
        const u64 k1 = k0 + chunk_len < readers ? k0 + chunk_len : readers;
        double acc = 0.0;
        for (u64 k = k0; k < k1; ++k) {
            acc += (double)d_dst[reader_dst_row(m, s, first_b, k) * cols + c];
        }
        partial[e] = acc;
    }
}

// Pass 2: d_src[s][c] += sum over the row's chunks, in ascending chunk order, rounded once.
// Rows nobody reads are left untouched.
extern "C" __global__ void copy_rows_backward_finish(
    const double* partial, float* d_src, u64 batch, u64 count, u64 cols, u64 src_stride,
    u64 src_start, u64 src_step, u64 dst_stride, u64 dst_start, u64 src_rows, u64 chunk_len) {
    const RowMap m = row_map(batch, count, cols, src_stride, src_start, src_step, dst_stride,
                             dst_start);
    const u64 n = src_rows * cols;
    FOR_EACH(e, n) {
        u64 first_b;
        const u64 readers = readers_of(m, div_u(e, cols), &first_b);
        if (readers == 0) continue;
        const u64 used = (readers + chunk_len - 1) / chunk_len;
        double acc = 0.0;
        for (u64 chunk = 0; chunk < used; ++chunk) acc += partial[chunk * n + e];
        d_src[e] = (float)((double)d_src[e] + acc);
    }
}

// Gather (see mae::backend::Gather). An index >= src_rows (a caller bug) moves nothing rather
// than reading out of bounds.
extern "C" __global__ void gather_rows(const float* src, const u32* idx, float* dst, u64 batch,
                                       u64 count, u64 cols, u64 src_rows, u64 src_stride,
                                       u64 src_start, u64 dst_rows, u64 dst_start) {
    const u64 n = batch * count * cols;
    FOR_EACH(e, n) {
        const u64 c = mod_u(e, cols);
        const u64 pair = div_u(e, cols);
        const u64 j = mod_u(pair, count), b = div_u(pair, count);
        const u64 k = idx[pair];
        if (k >= src_rows) continue;
        dst[(b * dst_rows + dst_start + j) * cols + c] =
            src[(b * src_stride + src_start + k) * cols + c];
    }
}

// The indices of one item are distinct and each item's sources lie apart (the host checks
// Gather::sources_apart), so no two threads add into one element.
extern "C" __global__ void gather_rows_backward(const float* d_dst, const u32* idx, float* d_src,
                                                u64 batch, u64 count, u64 cols, u64 src_rows,
                                                u64 src_stride, u64 src_start, u64 dst_rows,
                                                u64 dst_start) {
    const u64 n = batch * count * cols;
    FOR_EACH(e, n) {
        const u64 c = mod_u(e, cols);
        const u64 pair = div_u(e, cols);
        const u64 j = mod_u(pair, count), b = div_u(pair, count);
        const u64 k = idx[pair];
        if (k >= src_rows) continue;
        d_src[(b * src_stride + src_start + k) * cols + c] +=
            d_dst[(b * dst_rows + dst_start + j) * cols + c];
    }
}

// Images [batch, channels, height, width] to patches [batch, L, patch * patch * channels].
// `hwc` picks the order inside a patch: (y, x, c) when 1, (c, y, x) when 0. Pixels past the last
// whole patch are ignored, as the stride-p Conv2d ignores them.
//
// Where patches and image rows are whole float4s (`in_fours`: ViT's 16-pixel patches), a thread
// moves four pixels of a patch row at a time -- of one channel in (c, y, x) order, one 16-byte
// load and store; of every channel in (y, x, c) order, one load per channel and the 4 * channels
// floats of its own stretch of the patch -- so the index arithmetic (divisions by the grid,
// patch and channel counts) is paid once per four pixels. Per element, as the fallback below
// does it, that arithmetic held this copy to about a sixth of the memory's speed (281 us a call
// for 154 MB at batch 128 on an H200).
//
// The (y, x, c) stretch of C channels (1 to 4: grey, RGB, RGBA) is C float4s, 16-byte aligned
// (it starts 4 C floats into a patch row of a multiple of 4 C), so it goes out as C 16-byte
// stores, where the 4 C floats one at a time took three times the store instructions for RGB,
// each writing 4 bytes into a different 16 of every lane's 48.
template <u32 C>
__device__ __forceinline__ void patch_stretch_hwc(const float* src, u64 plane, float* dst) {
    float v[4 * C];
    UNROLL
    for (u32 c = 0; c < C; ++c) {
        const float4 f = *(const float4*)(src + c * plane);
        v[c] = f.x;
        v[C + c] = f.y;
        v[2 * C + c] = f.z;
        v[3 * C + c] = f.w;
    }
    UNROLL
    for (u32 j = 0; j < C; ++j) {
        ((float4*)dst)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    }
}

__device__ void patchify_fours(const float* imgs, float* out, u64 batch, u64 channels,
                               u64 height, u64 width, u64 patch, u32 hwc) {
    const u64 gw = width / patch, gh = height / patch, L = gh * gw;
    const u64 plen = patch * patch * channels, plane = height * width;
    const u64 quads = patch / 4;  // groups of four pixels in a patch row
    if (hwc) {
        // q = (patch index * patch + py) * quads + k
        const u64 n = batch * L * patch * quads;
        FOR_EACH(q, n) {
            const u64 row = div_u(q, quads), k = q - row * quads;
            const u64 pi = div_u(row, patch), py = row - pi * patch;
            const u64 b = div_u(pi, L), l = pi - b * L;
            const u64 ly = div_u(l, gw), lx = l - ly * gw;
            const float* src =
                imgs + b * channels * plane + (ly * patch + py) * width + lx * patch + 4 * k;
            float* dst = out + pi * plen + (py * patch + 4 * k) * channels;
            switch (channels) {
            case 1: patch_stretch_hwc<1>(src, plane, dst); continue;
            case 2: patch_stretch_hwc<2>(src, plane, dst); continue;
            case 3: patch_stretch_hwc<3>(src, plane, dst); continue;
            case 4: patch_stretch_hwc<4>(src, plane, dst); continue;
            default: break;
            }
            for (u64 c = 0; c < channels; ++c) {
                const float4 v = *(const float4*)(src + c * plane);
                dst[c] = v.x;
                dst[channels + c] = v.y;
                dst[2 * channels + c] = v.z;
                dst[3 * channels + c] = v.w;
            }
        }
    } else {
        // q = ((patch index * channels + c) * patch + py) * quads + k; the patch's row
        // (c, py) starts at out[((patch index * channels + c) * patch + py) * patch].
        const u64 n = batch * L * channels * patch * quads;
        FOR_EACH(q, n) {
            const u64 row = div_u(q, quads), k = q - row * quads;
            const u64 cy = div_u(row, patch), py = row - cy * patch;
            const u64 pi = div_u(cy, channels), c = cy - pi * channels;
            const u64 b = div_u(pi, L), l = pi - b * L;
            const u64 ly = div_u(l, gw), lx = l - ly * gw;
            const float* src = imgs + ((b * channels + c) * height + ly * patch + py) * width +
                               lx * patch + 4 * k;
            *(float4*)(out + row * patch + 4 * k) = *(const float4*)src;
        }
    }
}

extern "C" __global__ void patchify(const float* imgs, float* out, u64 batch, u64 channels,
                                    u64 height, u64 width, u64 patch, u32 hwc) {
    if (patch % 4 == 0 && in_fours(imgs, out, width)) {
        patchify_fours(imgs, out, batch, channels, height, width, patch, hwc);
        return;
    }
    const u64 gw = width / patch, gh = height / patch;
    const u64 plen = patch * patch * channels;
    const u64 n = batch * gh * gw * plen;
    FOR_EACH(e, n) {
        const u64 within = mod_u(e, plen);
        const u64 l = mod_u(div_u(e, plen), gh * gw);
        const u64 b = div_u(e, plen * gh * gw);
        // div_u and mod_u everywhere: a 64-bit `/` or `%` is a long software routine, and the
        // seven of them per element made this copy run at a tenth of the memory's speed.
        u64 c, py, px;
        if (hwc) {
            const u64 pixel = div_u(within, channels);
            c = within - pixel * channels;
            py = div_u(pixel, patch);
            px = pixel - py * patch;
        } else {
            c = div_u(within, patch * patch);
            const u64 row = div_u(within, patch);
            py = mod_u(row, patch);
            px = within - row * patch;
        }
        const u64 ly = div_u(l, gw);
        const u64 y = ly * patch + py, x = (l - ly * gw) * patch + px;
        out[e] = imgs[((b * channels + c) * height + y) * width + x];
    }
}

// heads[b, h, t, j] = x[b * tokens + t, col_offset + h * head_dim + j], in heads order.
// split_heads over elements of type V; head_dim, row_width and col_offset in units of V.
template <typename V>
__device__ void split_heads_of(const V* x, V* heads, u64 batch, u64 tokens, u64 num_heads,
                               u64 head_dim, u64 row_width, u64 col_offset) {
    const u64 n = batch * num_heads * tokens * head_dim;
    FOR_EACH(e, n) {
        const u64 row = div_u(e, head_dim), j = e - row * head_dim;
        const u64 bh = div_u(row, tokens), t = row - bh * tokens;
        const u64 b = div_u(bh, num_heads), h = bh - b * num_heads;
        heads[e] = x[(b * tokens + t) * row_width + col_offset + h * head_dim + j];
    }
}

extern "C" __global__ void split_heads(const float* x, float* heads, u64 batch, u64 tokens,
                                       u64 num_heads, u64 head_dim, u64 row_width,
                                       u64 col_offset) {
    if (in_fours(x, heads, head_dim) && row_width % 4 == 0 && col_offset % 4 == 0) {
        split_heads_of((const float4*)x, (float4*)heads, batch, tokens, num_heads, head_dim / 4,
                       row_width / 4, col_offset / 4);
    } else {
        split_heads_of(x, heads, batch, tokens, num_heads, head_dim, row_width, col_offset);
    }
}

// The inverse, in token order (b, t, h, j) so the writes into x coalesce; columns outside
// col_offset .. col_offset + num_heads * head_dim are left alone.
template <typename V>
__device__ void merge_heads_of(const V* heads, V* x, u64 batch, u64 tokens, u64 num_heads,
                               u64 head_dim, u64 row_width, u64 col_offset) {
    const u64 n = batch * tokens * num_heads * head_dim;
    FOR_EACH(e, n) {
        const u64 bth = div_u(e, head_dim), j = e - bth * head_dim;
        const u64 bt = div_u(bth, num_heads), h = bth - bt * num_heads;
        const u64 b = div_u(bt, tokens), t = bt - b * tokens;
        x[(b * tokens + t) * row_width + col_offset + h * head_dim + j] =
            heads[((b * num_heads + h) * tokens + t) * head_dim + j];
    }
}

extern "C" __global__ void merge_heads(const float* heads, float* x, u64 batch, u64 tokens,
                                       u64 num_heads, u64 head_dim, u64 row_width,
                                       u64 col_offset) {
    if (in_fours(heads, x, head_dim) && row_width % 4 == 0 && col_offset % 4 == 0) {
        merge_heads_of((const float4*)heads, (float4*)x, batch, tokens, num_heads, head_dim / 4,
                       row_width / 4, col_offset / 4);
    } else {
        merge_heads_of(heads, x, batch, tokens, num_heads, head_dim, row_width, col_offset);
    }
}
