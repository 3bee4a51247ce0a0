// Flash attention on the tensor cores, for the bf16 mode: attention.cu's algorithm (same
// layouts, same outputs, online softmax forward, the two-kernel backward without atomics) with
// every product on `mma.sync.m16n8k16` (bf16 operands rounded to nearest, f32 accumulation).
// Scores, probabilities, their gradients and the softmax statistics stay f32 in registers; only
// the operands of the products are rounded, as in the bf16 mode's GEMMs.
//
// A block of MMA_THREADS (4 warps) takes MMA_ROWS rows of one (image, head), 16 per warp, and
// walks the other side's rows in tiles of MMA_TILE (`mma_row_walk`: two staging buffers, the next
// tile's loads in flight while a tile is computed), staged in shared memory as bf16, row-major
// ([row][feature]), each row padded by MMA_PAD so that the eight rows of each 8 x 8 matrix that
// `ldmatrix` reads fall in eight different groups of four banks. `ldmatrix` gives the B fragments
// of products that contract over features, `ldmatrix.trans` those that contract over rows
// (probabilities times v, score gradients times k or q), so one staged layout serves both. The
// warp's own 16 rows are loaded straight into A fragments. Accumulators of a product over the
// tile (16 x MMA_TILE) have the layout of the A fragments of the next product (`mma_c_to_a`), so
// probabilities never leave registers.
//
// PTX fragment layouts of m16n8k16 (lane = 4 g + t): A (16 x 16) register j holds row
// g + 8 (j % 2), columns 8 (j / 2) + 2 t and + 1; B (16 x 8) register j holds rows (k)
// 8 j + 2 t and + 1 of column g; C (16 x 8) element i is row g + 8 (i / 2), column 2 t + i % 2.
// Columns hd .. HD of every operand are zero, and rows past `tokens` are zero (masked to -inf
// where they are keys of a softmax).

// The kernels ask for 3 to 5 resident blocks per multiprocessor (__launch_bounds__), which caps
// their registers at 168, 128 or 96: unbounded they took 168-228 registers, two blocks, too few warps
// to hide the staging's loads. Each direction is one kernel per head width for bf16 inputs (the
// bf16 mode's, where the time goes) and one for f32 inputs: as one kernel the four paths shared
// the largest one's register allocation, and ptxas 12.9 (sm_90) spilled 1.9 KB of loads in the
// forward and 3 KB in the dK-dV kernel, where the bf16 kernels alone spill a few bytes or none.
// MMA_BLOCKS_DELTA (defined by the host from `MAE_CUDA_ATTENTION_OCCUPANCY`, else 0) moves every
// kernel's request by one block, to measure occupancy against registers: one more caps them at
// 80-128 and spills (up to 1 KB of loads in the tail kernels, ptxas 12.9), one fewer lets most
// kernels run spill-free in 155-216.
#ifndef MMA_BLOCKS_DELTA
#define MMA_BLOCKS_DELTA 0
#endif
#define MMA_THREADS 128
#define MMA_ROWS 64
#define MMA_TILE 64
#define MMA_PAD 8
// 32-bit words of one staged tile for the widest head (64).
#define MMA_TILE_WORDS (MMA_TILE * (64 + MMA_PAD) / 2)
// bf16 values of the same: the distance between a walk's two staging buffers (`mma_row_walk`).
#define MMA_BUF (2 * MMA_TILE_WORDS)
// Bits of the kernels' `flags`: stage each tile while computing the one before (`mma_row_walk`;
// `MAE_CUDA_ATTENTION_PREFETCH`), and leave a last block whose rows fit in one warp to the
// tail kernels, which split its tiles over its four warps (`mma_has_tail`;
// `MAE_CUDA_ATTENTION_TAIL`).
#define MMA_PREFETCH 1u
#define MMA_SPLIT 2u

// A block's shared memory: two staged tiles (two buffers each), and in the dK-dV kernel the lse
// and Drow of the staged query rows. Declared in plain functions, not in the templates, so that
// a kernel running several instantiations (the f32 one: both head widths) holds them once.
struct MmaStaging {
    __align__(16) u32 a[2 * MMA_TILE_WORDS];
    __align__(16) u32 b[2 * MMA_TILE_WORDS];
};
__device__ __forceinline__ MmaStaging& mma_staging() {
    __shared__ MmaStaging st;
    return st;
}
struct MmaRowStats {
    __align__(16) float2 stats[2 * MMA_TILE];  // two buffers: (lse in base 2, Drow) per row
};
__device__ __forceinline__ MmaRowStats& mma_row_stats() {
    __shared__ MmaRowStats rs;
    return rs;
}


// These kernels are bound by instructions issued, not by the tensor cores (a block's tile took
// thousands of cycles for 256 `mma`), so the softmax works in base 2: scores are scaled by
// scale log2(e) once, and every exponential is one `ex2` (2^x, a few ulps of f32, flushing
// results below 2^-126 to zero: far below the bf16 rounding of the probabilities for their
// products) instead of expf's range reduction (`exp2_fast`, prelude.cuh).

// d += a b for one m16n8k16 product of bf16 fragments with f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
#ifdef MAE_HOST_SHIM
    host_mma_bf16(d, a, b0, b1);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    // Not reached: the host selects these kernels on compute capability 8.0 and above only.
    asm volatile("trap;");
#endif
}

// Two 8 x 8 matrices of b16 from shared memory, one `ldmatrix.x2`: lanes 8 i .. 8 i + 7 (i < 2)
// give the addresses of matrix i's eight rows (16 bytes each, 16-byte aligned; the other lanes'
// addresses are not read), and register i of lane 4 g + t receives row g, columns 2 t and
// 2 t + 1 of matrix i; with `trans`, of matrix i transposed (its rows 2 t and 2 t + 1 of column
// g). This lane's row is element `at` of the shared `tile`: the tile's shared-window address is
// the same for every call (computed once), and offsets that unrolling makes constant fold into
// the instruction, where an address per call took a register each and spilled.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x2(u32* r, const u16* tile, u32 at) {
#ifdef MAE_HOST_SHIM
    host_ldmatrix(r, tile + at, TRANS, 2);
#else
    const u32 a = (u32)__cvta_generic_to_shared(tile) + 2 * at;
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(a));
    }
#endif
}

// Four 8 x 8 matrices the same way (`ldmatrix.x4`): lanes 8 i .. 8 i + 7 address matrix i, and
// register i receives its part of matrix i. One instruction where two `x2` took two.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(u32* r, const u16* tile, u32 at) {
#ifdef MAE_HOST_SHIM
    host_ldmatrix(r, tile + at, TRANS, 4);
#else
    const u32 a = (u32)__cvta_generic_to_shared(tile) + 2 * at;
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
#endif
}

// BYTES (16 or 8) from global to shared memory without passing through registers: the copy
// runs while the thread goes on, until `cp_async_wait_all`. With `valid` false it writes zeros
// and reads nothing (`src` is then any mapped address). 16 bytes go by `cp.async.cg`, which
// caches in L2 only, 8 by `.ca` (`.cg` takes no other size).
template <u32 BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    static_assert(BYTES == 16 || BYTES == 8, "cp.async of 16 or 8 bytes");
#ifdef MAE_HOST_SHIM
    host_cp_async(dst, src, BYTES, valid);
#elif __CUDA_ARCH__ >= 800
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    if (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                     "r"(valid ? 16 : 0));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src),
                     "r"(valid ? 8 : 0));
    }
#else
    asm volatile("trap;");  // not reached: these kernels run on 8.0 and later only
#endif
}

// Closes the thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if !defined(MAE_HOST_SHIM) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until every copy this thread issued has landed (the block's other threads' copies are
// visible after the barrier that follows).
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef MAE_HOST_SHIM
    host_cp_async_wait_all();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

// Max and sum over the four lanes of a group (lanes 4 g .. 4 g + 3 share rows g and g + 8).
__device__ __forceinline__ float group_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float group_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Staging: rows r0 .. r0 + MMA_TILE of one head, as bf16, into shared memory. `src` points at
// the head's column 0 in row 0, rows `stride` elements apart, `rows` of them valid; rows past
// `rows` and columns past `hd` are staged as zeros. Every thread of the block calls a staging
// function (from `mma_row_walk`, which puts the barriers around it). `wide` (`mma_rows_wide`,
// tested once a walk: every tile's rows start where the first's do, modulo 16 bytes) says that
// the rows start on 16 bytes and hold whole 16-byte pieces of the head, as in every ViT: then
// floats move four per load, each thread issuing all of its loads before its first store, and
// rows already in bf16 move by `cp.async`, landing while the thread computes the tile before. A
// thread's pieces lie in rows STEP apart at one column, so its addresses are one product and
// constant offsets a tile: the per-tile tests and 64-bit arithmetic of a general loop took
// about 170 instructions of a forward tile's 540 (sm_90).

// Whether rows of `src` (`stride` elements apart, the head's `hd` columns) start on 16 bytes
// and hold whole 16-byte pieces.
template <typename T>
__device__ __forceinline__ bool mma_rows_wide(const T* src, u64 stride, u32 hd) {
    constexpr u32 PIECE = 16 / sizeof(T);
    return hd % PIECE == 0 && stride % PIECE == 0 && ((u64)src & 15) == 0;
}

__device__ __forceinline__ u32 mma_stage_valid(u64 r0, u64 rows) {
    return (u32)(rows - r0 < MMA_TILE ? rows - r0 : MMA_TILE);
}

// Row-major ([row][feature], rows HD + MMA_PAD apart) into `rm`. Consecutive threads take
// consecutive four-feature groups of a row: coalesced loads, and 8-byte stores that each half
// warp spreads over the 32 banks.
template <int HD>
__device__ void mma_stage_rows(u16* rm, const float* src, u64 stride, u64 r0, u64 rows, u32 hd,
                               bool wide) {
    const float* first = src + r0 * stride;
    const u32 valid = mma_stage_valid(r0, rows);
    if (wide) {
        constexpr u32 PER = MMA_TILE * HD / 4 / MMA_THREADS;
        float4 v[PER];
        UNROLL
        for (u32 k = 0; k < PER; ++k) {
            const u32 e = threadIdx.x + k * MMA_THREADS, r = e / (HD / 4), c = 4 * (e % (HD / 4));
            v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < valid && c < hd) v[k] = *(const float4*)(first + r * stride + c);
        }
        UNROLL
        for (u32 k = 0; k < PER; ++k) {
            const u32 e = threadIdx.x + k * MMA_THREADS, r = e / (HD / 4), c = 4 * (e % (HD / 4));
            *(uint2*)(rm + r * (HD + MMA_PAD) + c) =
                make_uint2(pack_bf16(v[k].x, v[k].y), pack_bf16(v[k].z, v[k].w));
        }
        return;
    }
    for (u32 e = threadIdx.x; e < MMA_TILE * HD; e += MMA_THREADS) {
        const u32 r = e / HD, c = e % HD;
        const bool in = r < valid && c < hd;
        rm[r * (HD + MMA_PAD) + c] = in ? (u16)bf16_bits(first[r * stride + c]) : 0;
    }
}

// The same from rows already in bf16 (qkv's copy alone, bf16.rs `inputs`): nothing to round, so
// staging is a copy, 16 bytes per `cp.async` where `wide`, which lands by the next
// `cp_async_wait_all`. Row numbers fit in 32 bits (a head's rows are `tokens` of one image).
template <int HD>
__device__ void mma_stage_rows(u16* rm, const u16* src, u64 stride, u64 r0, u64 rows, u32 hd,
                               bool wide) {
    if (wide) {
        // Thread x copies features 8 (x % (HD / 8)) .. + 8 of rows x / (HD / 8) + STEP k.
        constexpr u32 PER = MMA_TILE * HD / 8 / MMA_THREADS, STEP = MMA_THREADS / (HD / 8);
        const u32 r = threadIdx.x / (HD / 8), c = 8 * (threadIdx.x % (HD / 8));
        const u32 row = (u32)r0 + r, left = (u32)rows;
        const u16* from = src + (u64)row * (u32)stride + c;
        UNROLL
        for (u32 k = 0; k < PER; ++k) {
            const bool in = row + k * STEP < left && c < hd;
            cp_async<16>(rm + (r + k * STEP) * (HD + MMA_PAD) + c,
                       in ? from + (u64)(k * STEP) * (u32)stride : src, in);
        }
        return;
    }
    const u16* first = src + r0 * stride;
    const u32 valid = mma_stage_valid(r0, rows);
    for (u32 e = threadIdx.x; e < MMA_TILE * HD; e += MMA_THREADS) {
        const u32 r = e / HD, c = e % HD;
        rm[r * (HD + MMA_PAD) + c] = r < valid && c < hd ? first[r * stride + c] : (u16)0;
    }
}

// The A fragments of this warp's 16 rows row0 .. row0 + 16 of one head (`src`, `stride` and
// `rows` as in mma_stage), one per 16 features.
template <int HD>
__device__ void mma_load_a(u32 (*a)[4], const float* src, u64 stride, u64 row0, u64 rows,
                           u32 hd) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    UNROLL
    for (u32 kk = 0; kk < HD / 16; ++kk) {
        UNROLL
        for (u32 j = 0; j < 4; ++j) {
            const u64 r = row0 + g + 8 * (j % 2);
            const u32 c = 16 * kk + 8 * (j / 2) + 2 * t;
            const float* p = src + r * stride + c;
            const bool in = r < rows;
            a[kk][j] = pack_bf16(in && c < hd ? p[0] : 0.0f, in && c + 1 < hd ? p[1] : 0.0f);
        }
    }
}

// The same from rows already in bf16.
template <int HD>
__device__ void mma_load_a(u32 (*a)[4], const u16* src, u64 stride, u64 row0, u64 rows, u32 hd) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    UNROLL
    for (u32 kk = 0; kk < HD / 16; ++kk) {
        UNROLL
        for (u32 j = 0; j < 4; ++j) {
            const u64 r = row0 + g + 8 * (j % 2);
            const u32 c = 16 * kk + 8 * (j / 2) + 2 * t;
            const u16* p = src + r * stride + c;
            const bool in = r < rows;
            const u32 lo = in && c < hd ? p[0] : 0, hi = in && c + 1 < hd ? p[1] : 0;
            a[kk][j] = lo | hi << 16;
        }
    }
}

// The same through shared memory, for rows already in bf16 that are `wide` (`mma_rows_wide`),
// in two steps so that a kernel's operands load together: `mma_issue_rows` copies the warp's 16
// rows into `slot` (16 rows HD + MMA_PAD apart, the warp's own) by `cp.async`, 16 bytes a copy,
// and `mma_take_rows` waits for them and takes the fragments with one `ldmatrix.x4` per 16
// features (lane l points at row l % 16, features 16 kk + 8 (l / 16): matrices 0-3 are the
// fragment's registers 0-3). Loaded directly, each fragment register takes two 2-byte loads,
// and each load instruction touches eight rows, so eight cache lines, for 64 bytes; such
// accesses (these loads and `mma_store`'s) are one suspect for the H200's profile, where every
// attention kernel moved about 1.1 TB/s far below its tensor-core rate (2026-11-28).
// `mma_issue_rows` returns whether it staged; where not (floats, or rows not wide),
// `mma_take_rows` loads directly. Every lane of the warp calls both.
template <int HD>
__device__ __forceinline__ bool mma_issue_rows(u16* slot, const u16* src, u64 stride, u64 row0,
                                               u64 rows, u32 hd) {
    if (!mma_rows_wide(src, stride, hd)) return false;
    constexpr u32 PIECES = HD / 8, PER = 16 * PIECES / 32;
    const u32 lane = threadIdx.x % 32;
    UNROLL
    for (u32 k = 0; k < PER; ++k) {
        const u32 e = lane + 32 * k, r = e / PIECES, c = 8 * (e % PIECES);
        const bool in = row0 + r < rows && c < hd;
        cp_async<16>(slot + r * (HD + MMA_PAD) + c, in ? src + (row0 + r) * stride + c : src, in);
    }
    return true;
}
template <int HD>
__device__ __forceinline__ bool mma_issue_rows(u16*, const float*, u64, u64, u64, u32) {
    return false;
}

// The warp's A fragments: staged rows from `slot`, once every copy the thread has issued (a
// walk's first tile among them) has landed; else straight from `src`.
template <int HD, typename Q>
__device__ __forceinline__ void mma_take_rows(u32 (*a)[4], bool staged, const u16* slot,
                                              const Q* src, u64 stride, u64 row0, u64 rows,
                                              u32 hd) {
    if (!staged) {
        mma_load_a<HD>(a, src, stride, row0, rows, hd);
        return;
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();  // the other lanes' copies are visible
    const u32 lane = threadIdx.x % 32;
    UNROLL
    for (u32 kk = 0; kk < HD / 16; ++kk) {
        ldsm_x4<false>(a[kk], slot, (lane % 16) * (HD + MMA_PAD) + 16 * kk + 8 * (lane / 16));
    }
}

// The warp's 16-row slot in buffer 1 of a staging area: a walk's prologue stages the warp's
// own rows there (`mma_row_walk`).
template <int HD>
__device__ __forceinline__ u16* mma_warp_slot(u16* staging) {
    return staging + MMA_BUF + 16 * (threadIdx.x / 32) * (HD + MMA_PAD);
}

// An element of a row as f32: itself, or the bf16 value of its bits.
__device__ __forceinline__ float mma_value(float x) { return x; }
__device__ __forceinline__ float mma_value(u16 x) { return __uint_as_float((u32)x << 16); }

// Partial tiles. Only the last tile of a row walk holds fewer than MMA_TILE valid rows (197
// tokens: 5 of 64), and products over its rows past the valid ones add exact zeros (their
// probabilities are 0). So the tile functions take STEPS, the k-steps of 16 rows (the k of one
// `mma`) that they compute: 4 for a whole tile, 2 or 1 where the valid rows fit in 32 or 16
// (`MMA_BY_STEPS`). Each is its own straight-line instantiation: tests inside one copy of the
// tile's code made it larger and made ptxas spill.

// Whether a kernel's B fragments come four 8 x 8 matrices per `ldmatrix` (`.x4`) or two
// (`.x2`): four at head width 32 (the decoder's), where the kernels issue 12 to 17 % fewer
// instructions a whole tile and spill no more; at 64 the four registers each load fills made
// ptxas 12.9 spill inside the main loops (sm_90), so two.
#define MMA_X4(HD) ((HD) == 32)

// s = a x^T over the HD features for n-tile n: the warp's 16 rows (A fragments) against rows
// 8 n .. 8 n + 8 of a row-major tile `rm`, as 16 x 8 accumulators. The B fragments come from
// `ldmatrix`: with `.x4` two k-steps at a time, lane l pointing at row 8 n + l % 8, features
// 32 kk + 8 (l / 8) (matrices 0, 1 are k-step 2 kk, matrices 2, 3 k-step 2 kk + 1); with `.x2`
// one, lane l at row 8 n + l % 8, features 16 kk + 8 (l / 8 % 2).
template <int HD>
__device__ __forceinline__ void mma_score_ntile(float* s, const u32 (*a)[4], const u16* rm,
                                                u32 n) {
    const u32 lane = threadIdx.x % 32;
    UNROLL
    for (u32 i = 0; i < 4; ++i) s[i] = 0.0f;
    if (MMA_X4(HD)) {
        const u32 row = (8 * n + lane % 8) * (HD + MMA_PAD) + 8 * (lane / 8);
        UNROLL
        for (u32 kk = 0; kk < HD / 32; ++kk) {
            u32 b[4];
            ldsm_x4<false>(b, rm, row + 32 * kk);
            mma_bf16(s, a[2 * kk], b[0], b[1]);
            mma_bf16(s, a[2 * kk + 1], b[2], b[3]);
        }
        return;
    }
    const u32 row = (8 * n + lane % 8) * (HD + MMA_PAD) + 8 * (lane / 8 % 2);
    UNROLL
    for (u32 kk = 0; kk < HD / 16; ++kk) {
        u32 b[2];
        ldsm_x2<false>(b, rm, row + 16 * kk);
        mma_bf16(s, a[kk], b[0], b[1]);
    }
}

// The same for the first 16 STEPS rows of the tile, as 16 x 16 STEPS accumulators (s[n] holds
// columns 8 n .. 8 n + 8).
template <int HD, int STEPS>
__device__ __forceinline__ void mma_scores(float (*s)[4], const u32 (*a)[4], const u16* rm) {
    UNROLL
    for (u32 n = 0; n < 2 * STEPS; ++n) mma_score_ntile<HD>(s[n], a, rm, n);
}

// acc += p x over the tile's first 16 STEPS rows: p (A fragments of 16 x 16 STEPS) times the
// row-major tile `rm`, into 16 x HD accumulators (acc[n] holds features 8 n .. 8 n + 8). The B
// fragments are the tile's 8 x 8 blocks transposed (`ldmatrix.trans`): with `.x4` two k-steps
// at a time (lane l points at row 16 kk + l, features 8 n .. 8 n + 8), the rest one at a time
// (`.x2`: lane l at row 16 kk + l % 16).
template <int HD, int STEPS>
__device__ __forceinline__ void mma_accumulate(float (*acc)[4], const u32 (*p)[4],
                                               const u16* rm) {
    const u32 lane = threadIdx.x % 32;
    constexpr u32 PAIRS = MMA_X4(HD) ? STEPS / 2 : 0;
    UNROLL
    for (u32 n = 0; n < HD / 8; ++n) {
        UNROLL
        for (u32 kk = 0; kk < 2 * PAIRS; kk += 2) {
            u32 b[4];
            ldsm_x4<true>(b, rm, (16 * kk + lane) * (HD + MMA_PAD) + 8 * n);
            mma_bf16(acc[n], p[kk], b[0], b[1]);
            mma_bf16(acc[n], p[kk + 1], b[2], b[3]);
        }
        UNROLL
        for (u32 kk = 2 * PAIRS; kk < STEPS; ++kk) {
            u32 b[2];
            ldsm_x2<true>(b, rm, (16 * kk + lane % 16) * (HD + MMA_PAD) + 8 * n);
            mma_bf16(acc[n], p[kk], b[0], b[1]);
        }
    }
}

// Calls TILE<HD, STEPS, MASK>(args...) of a key tile (the forward and dQ kernels) with the
// fewest STEPS (4, 2 or 1) that cover `valid` keys. Whole tiles, all but the last of a walk, run
// without the key mask's tests (MASK false): an instantiation of their own, as tests inside the
// straight-line code cost 48 of the forward's 372 instructions a tile (sm_90).
#define MMA_BY_STEPS(valid, TILE, ...)           \
    do {                                         \
        if ((valid) == MMA_TILE) {               \
            TILE<HD, 4, false>(__VA_ARGS__);     \
        } else if ((valid) > 32) {               \
            TILE<HD, 4, true>(__VA_ARGS__);      \
        } else if ((valid) > 16) {               \
            TILE<HD, 2, true>(__VA_ARGS__);      \
        } else {                                 \
            TILE<HD, 1, true>(__VA_ARGS__);      \
        }                                        \
    } while (0)

// Zeroes 16 x HD accumulators.
template <int HD>
__device__ __forceinline__ void mma_zero(float (*acc)[4]) {
    UNROLL
    for (u32 n = 0; n < HD / 8; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    }
}

// The A fragments (bf16) of 16 x 16 STEPS accumulators: n-tiles 2 kk and 2 kk + 1 are k-step
// kk.
template <int STEPS>
__device__ __forceinline__ void mma_c_to_a(u32 (*a)[4], const float (*c)[4]) {
    UNROLL
    for (u32 kk = 0; kk < STEPS; ++kk) {
        a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// Writes 16 x HD accumulators times `scale` to this warp's rows of one head, at element `at` of
// `dst` (row stride `stride`), rows below `rows` and columns below `hd` only; where `dst16` is
// not null, also their bf16 copy at the same places (the operand of the Linear layer that reads
// `dst`: bf16.rs, `produced_copy`). A null `dst` writes the copy alone (bf16.rs,
// `overwritten_floats`).
//
// Where the rows allow it (hd a multiple of 16, every row's first element 16 bytes into the
// floats and 8 into the copy), each lane first trades half of each pair of n-tiles with its
// neighbour in the group (`__shfl_xor_sync`, lane t ^ 1), so that it holds four consecutive
// columns of its rows, and stores them as one 16-byte piece of floats and one 8-byte piece of
// the copy: the group's four lanes then write 64 consecutive bytes of a row, where each of
// the lanes' 4-byte and 2-byte stores touched eight rows each. The same values either way.
// Every lane of the warp calls it.
template <int HD>
__device__ void mma_store(float* dst, u16* dst16, u64 at, u64 stride, u64 row0, u64 rows, u32 hd,
                          const float (*acc)[4], float scale) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool wide = hd % 16 == 0 && stride % 4 == 0 && at % 4 == 0 && ((u64)dst & 15) == 0 &&
                      ((u64)dst16 & 7) == 0;
    if (wide) {
        // Of n-tiles 2 p and 2 p + 1, an even lane keeps the first's columns 2 t, 2 t + 1 and
        // takes its neighbour's (2 t + 2, 2 t + 3); an odd lane takes its neighbour's of the
        // second and keeps its own: columns 16 p + 8 (t % 2) + 4 (t / 2) .. + 4.
        const bool odd = t % 2 != 0;
        UNROLL
        for (u32 p = 0; p < HD / 16; ++p) {
            const u32 c = 16 * p + 8 * (t % 2) + 4 * (t / 2);
            UNROLL
            for (u32 h = 0; h < 2; ++h) {
                // Selects, not an index that depends on the lane: that would put acc in local
                // memory.
                const float a0 = acc[2 * p][2 * h], a1 = acc[2 * p][2 * h + 1];
                const float b0 = acc[2 * p + 1][2 * h], b1 = acc[2 * p + 1][2 * h + 1];
                const float got0 = __shfl_xor_sync(0xffffffffu, odd ? a0 : b0, 1);
                const float got1 = __shfl_xor_sync(0xffffffffu, odd ? a1 : b1, 1);
                const float4 v =
                    odd ? make_float4(scale * got0, scale * got1, scale * b0, scale * b1)
                        : make_float4(scale * a0, scale * a1, scale * got0, scale * got1);
                const u64 r = row0 + g + 8 * h;
                if (r < rows && c < hd) {
                    if (dst) *(float4*)(dst + at + r * stride + c) = v;
                    if (dst16) *(uint2*)(dst16 + at + r * stride + c) = bf16_quad(v);
                }
            }
        }
        return;
    }
    UNROLL
    for (u32 n = 0; n < HD / 8; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) {
            const u64 r = row0 + g + 8 * (i / 2);
            const u32 c = 8 * n + 2 * t + i % 2;
            if (r < rows && c < hd) {
                const float v = scale * acc[n][i];
                if (dst) dst[at + r * stride + c] = v;
                if (dst16) dst16[at + r * stride + c] = (u16)bf16_bits(v);
            }
        }
    }
}

// Whether the last block of `tokens` rows holds rows for its first warp only (tokens % 64 in
// 1 .. 16: the last block at 197 tokens holds 5 rows, at 257 one). Three of its warps would only
// stage, and the block would hold its slot for a whole walk with one warp at work. With
// MMA_SPLIT the main kernels leave such blocks out (`mma_row_tiles`) and the tail kernels run
// them split: every warp takes those same rows against a 16-row slice of each staged tile
// (`mma_slice`), so the walk's computation is shared four ways, and at the end the warps'
// partial results are merged into the first warp's (`mma_share`, `mma_add_shared`, and the
// forward's `mma_forward_merge`). Kernels of their own, so that the split path takes nothing
// from the main kernels' register allocation (in one kernel it put spilled values into the
// dK-dV kernel's main loop).
__device__ __forceinline__ bool mma_has_tail(u64 tokens) {
    const u64 last = tokens % MMA_ROWS;
    return last >= 1 && last <= 16;
}

// The row blocks of one (image, head) that a main kernel takes.
__device__ __forceinline__ u64 mma_row_tiles(u64 tokens, u32 flags) {
    const u64 tiles = (tokens + MMA_ROWS - 1) / MMA_ROWS;
    return (flags & MMA_SPLIT) && mma_has_tail(tokens) ? tiles - 1 : tiles;
}

// Block g of a grid of `tiles` blocks per (image, head): of a main kernel, or (SPLIT, one a
// pair) of a tail kernel, which takes the last rows.
template <bool SPLIT>
__device__ __forceinline__ AttBlock mma_block(u64 g, u64 tiles, u64 heads, u64 tokens) {
    AttBlock blk = att_block(g, tiles, heads, MMA_ROWS);
    if (SPLIT) blk.row0 = tokens - tokens % MMA_ROWS;
    return blk;
}

// The valid rows of this warp's 16-row slice of a staged tile with `valid` valid rows.
__device__ __forceinline__ u32 mma_slice(u32 valid) {
    const u32 first = 16 * (threadIdx.x / 32);
    const u32 rest = valid > first ? valid - first : 0u;
    return rest < 16u ? rest : 16u;
}

// Offset of this warp's slice in a staged tile (bf16 values).
__device__ __forceinline__ u32 mma_slice_at(u32 hd_padded) {
    return 16 * (threadIdx.x / 32) * hd_padded;
}

// After a split walk: warps 1-3 leave their accumulator fragments `acc` in `scratch` (3 x 32 x
// HD / 2 floats of the staging memory), lane-major so that a warp's stores and loads hit
// different banks. Between two barriers (the caller's), with `mma_add_shared` after the second.
template <int HD>
__device__ __forceinline__ void mma_share(const float (*acc)[4], float* scratch) {
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* mine = scratch + (warp - 1) * (HD / 2) * 32 + lane;
    UNROLL
    for (u32 n = 0; n < HD / 8; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) mine[32 * (4 * n + i)] = acc[n][i];
    }
}

// Warp 0 adds the other warps' shared fragments to its own, in warp order (deterministic).
template <int HD>
__device__ __forceinline__ void mma_add_shared(float (*acc)[4], const float* scratch) {
    const u32 lane = threadIdx.x % 32;
    for (u32 w = 0; w < 3; ++w) {
        const float* theirs = scratch + w * (HD / 2) * 32 + lane;
        UNROLL
        for (u32 n = 0; n < HD / 8; ++n) {
            UNROLL
            for (u32 i = 0; i < 4; ++i) acc[n][i] += theirs[32 * (4 * n + i)];
        }
    }
}

// The walk over the other side's rows of one (image, head) in tiles of MMA_TILE, for every
// thread of the block: stage(buf, j0) stages the tile at row j0 into staging buffer `buf` (0 or
// 1), compute(buf, j0) computes it. The two buffers take turns, and tile j0 + MMA_TILE is
// staged (its copies issued; in flight during the computation where `stage` uses cp.async)
// before tile j0 is computed. One barrier a tile: past it every copy of the tile has landed,
// and every thread has finished the tile before, whose buffer the next staging overwrites. The
// barrier before the first staging keeps it off the last buffer of the block before (the
// kernels loop over blocks).
//
// Without MMA_PREFETCH in `flags` (`MAE_CUDA_ATTENTION_PREFETCH=off`, for measuring one
// against the other) the thread waits for the next tile's copies as soon as it has issued
// them, so no load is in flight during a computation, as before the prefetch.
//
// A warp whose 16 rows all lie past `tokens` (three of the four in the last block of 197 tokens)
// only helps stage: each kernel gives it a walk of its own with nothing to compute, since a
// test inside the main loop made ptxas spill there. In a tail kernel's split block
// (`mma_has_tail`) every warp computes.
//
// `prologue` runs once, after the first tile's copies are issued and before the first barrier:
// it loads the warp's own rows into A fragments (`mma_take_rows`), through buffer 1, which the
// first tile leaves free and which the loop stages into only past that barrier.
template <typename Stage, typename Compute, typename Prologue>
__device__ __forceinline__ void mma_row_walk(u64 tokens, u32 flags, Stage stage, Compute compute,
                                             Prologue prologue) {
    __syncthreads();
    stage(0u, (u64)0);
    prologue();
    cp_async_commit();
    u32 buf = 0;
    for (u64 j0 = 0; j0 < tokens; j0 += MMA_TILE) {
        cp_async_wait_all();
        __syncthreads();
        if (j0 + MMA_TILE < tokens) {
            stage(buf ^ 1u, j0 + MMA_TILE);
            cp_async_commit();
            if (!(flags & MMA_PREFETCH)) cp_async_wait_all();
        }
        compute(buf, j0);
        buf ^= 1u;
    }
}

// The key tile at j0 of one head for the forward and dQ kernels: k into `ks`, v into `vs`
// (`base` points at the head's q columns in row 0 of its image).
template <int HD, typename Q>
__device__ __forceinline__ void mma_stage_kv(u16* ks, u16* vs, const Q* base, u64 dim, u64 j0,
                                             u64 tokens, u32 hd, bool wide) {
    mma_stage_rows<HD>(ks, base + dim, 3 * dim, j0, tokens, hd, wide);
    mma_stage_rows<HD>(vs, base + 2 * dim, 3 * dim, j0, tokens, hd, wide);
}

// Whether k's and v's rows of a head allow wide staging (`mma_rows_wide`).
template <typename Q>
__device__ __forceinline__ bool mma_kv_wide(const Q* base, u64 dim, u32 hd) {
    return mma_rows_wide(base + dim, 3 * dim, hd) && mma_rows_wide(base + 2 * dim, 3 * dim, hd);
}

// The tile's keys at or past `keys` (only the last tile of a row has fewer than MMA_TILE), as
// seen by this lane's score accumulators: whether column i of n-tile n is one of them.
__device__ __forceinline__ bool mma_key_out(u32 n, u32 i, u32 keys) {
    return 8 * n + 2 * (threadIdx.x % 4) + i % 2 >= keys;
}

// One key tile of the forward for this warp's rows: the scores on the tensor cores, the running
// maximum m and sum l per row (rows g and g + 8 of the warp, each spread over a group's four
// lanes), the output o rescaled, then o += p v. `keys` of the tile's keys are valid, within its
// first 16 STEPS; with MASK false all MMA_TILE are. m is the maximum of the unscaled scores:
// scale2 (scale log2 e) is positive, so scaling keeps the order, and each exponential is then
// one fma and one ex2 of scale2 (s - m) in base 2.
template <int HD, int STEPS, bool MASK>
__device__ __forceinline__ void mma_forward_tile(const u32 (*q)[4], float (*o)[4], float* m,
                                                 float* l, const u16* ks, const u16* vs,
                                                 u32 keys, float scale2) {
    float s[2 * STEPS][4];
    mma_scores<HD, STEPS>(s, q, ks);
    float tile_max[2] = {NEG_INF, NEG_INF};
    UNROLL
    for (u32 n = 0; n < 2 * STEPS; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) {
            if (MASK && mma_key_out(n, i, keys)) s[n][i] = NEG_INF;
            tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
        }
    }
    float shift[2];
    UNROLL
    for (u32 r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], group_max(tile_max[r]));
        // 2^-inf = 0 on the first tile, where l and o are still 0.
        const float corr = exp2_fast((m[r] - m_new) * scale2);
        l[r] *= corr;
        UNROLL
        for (u32 n = 0; n < HD / 8; ++n) {
            o[n][2 * r] *= corr;
            o[n][2 * r + 1] *= corr;
        }
        m[r] = m_new;
        shift[r] = -m_new * scale2;
    }
    UNROLL
    for (u32 n = 0; n < 2 * STEPS; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) {
            // Masked keys: 2^-inf = 0.
            s[n][i] = exp2_fast(fmaf(s[n][i], scale2, shift[i / 2]));
            l[i / 2] += s[n][i];
        }
    }
    u32 p[STEPS][4];
    mma_c_to_a<STEPS>(p, s);
    mma_accumulate<HD, STEPS>(o, p, vs);
}

// A split forward's merge (`mma_has_tail`): warps 1-3 leave (m, l, o) in `scratch` (3 x 32 x
// (4 + HD / 2) floats of the staging memory, after every warp's last tile), and warp 0 rescales
// each to the larger maximum and adds it, as FlashAttention's split-k combine: l and o of a
// part weigh 2^((m_part - m) scale log2 e). Warp 0's m is finite (its slice of the first tile
// holds key 0); a part whose slices held no valid key has m = -inf and weighs 0. Returns
// whether this warp holds the merged rows (warp 0); the others are done.
template <int HD>
__device__ bool mma_forward_merge(float (*o)[4], float* m, float* l, float scale2,
                                  float* scratch) {
    constexpr u32 FIELDS = 4 + HD / 2;
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // every warp is done with the staged tiles
    if (warp > 0) {
        float* mine = scratch + (warp - 1) * FIELDS * 32 + lane;
        UNROLL
        for (u32 r = 0; r < 2; ++r) {
            mine[32 * r] = m[r];
            mine[32 * (2 + r)] = l[r];
        }
        UNROLL
        for (u32 n = 0; n < HD / 8; ++n) {
            UNROLL
            for (u32 i = 0; i < 4; ++i) mine[32 * (4 + 4 * n + i)] = o[n][i];
        }
    }
    __syncthreads();
    if (warp > 0) return false;
    for (u32 w = 0; w < 3; ++w) {
        const float* theirs = scratch + w * FIELDS * 32 + lane;
        UNROLL
        for (u32 r = 0; r < 2; ++r) {
            const float mw = theirs[32 * r], m_new = fmaxf(m[r], mw);
            const float mine_w = exp2_fast((m[r] - m_new) * scale2);
            const float part_w = exp2_fast((mw - m_new) * scale2);
            l[r] = l[r] * mine_w + theirs[32 * (2 + r)] * part_w;
            UNROLL
            for (u32 n = 0; n < HD / 8; ++n) {
                UNROLL
                for (u32 c = 0; c < 2; ++c) {
                    const u32 i = 2 * r + c;
                    o[n][i] = o[n][i] * mine_w + theirs[32 * (4 + 4 * n + i)] * part_w;
                }
            }
            m[r] = m_new;
        }
    }
    return true;
}

// Forward for one block: the key tiles in turn, then the output normalized by each row's sum.
// The row sum adds the f32 exponentials, so lse is as exact as the scores; their bf16 roundings
// in the product with v weigh each v_j within 2^-8 of it.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_forward_block(const Q* qkv, float* out, u16* out16, float* lse, u64 tokens,
                                  u64 heads, u32 hd, float scale, AttBlock blk, u32 flags,
                                  u16* ks, u16* vs) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u32 lane = threadIdx.x % 32, t = lane % 4;
    const u64 row0 = blk.row0 + (SPLIT ? 0 : 16 * (threadIdx.x / 32));
    const Q* base = qkv + blk.b * tokens * width + blk.h * hd;
    const bool wide = mma_kv_wide(base, dim, hd);
    auto stage = [&](u32 buf, u64 j0) {
        mma_stage_kv<HD>(ks + buf * MMA_BUF, vs + buf * MMA_BUF, base, dim, j0, tokens, hd, wide);
    };
    if (row0 >= tokens) {  // past the tokens: only helps stage
        mma_row_walk(tokens, flags, stage, [](u32, u64) {}, [] {});
        return;
    }
    u32 q[HD / 16][4];
    u16* slot = mma_warp_slot<HD>(ks);
    auto load_q = [&] {
        const bool staged = mma_issue_rows<HD>(slot, base, width, row0, tokens, hd);
        mma_take_rows<HD>(q, staged, slot, base, width, row0, tokens, hd);
    };
    float o[HD / 8][4];
    mma_zero<HD>(o);
    const float scale2 = scale * LOG2E;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    if (SPLIT) {
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 j0) {
                const u32 keys = mma_slice(mma_stage_valid(j0, tokens));
                const u32 at = buf * MMA_BUF + mma_slice_at(HD + MMA_PAD);
                if (keys == 16) {
                    mma_forward_tile<HD, 1, false>(q, o, m, l, ks + at, vs + at, keys, scale2);
                } else if (keys > 0) {
                    mma_forward_tile<HD, 1, true>(q, o, m, l, ks + at, vs + at, keys, scale2);
                }
            },
            load_q);
        if (!mma_forward_merge<HD>(o, m, l, scale2, (float*)ks)) return;
    } else {
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 j0) {
                const u32 keys = mma_stage_valid(j0, tokens);
                const u16 *k = ks + buf * MMA_BUF, *v = vs + buf * MMA_BUF;
                MMA_BY_STEPS(keys, mma_forward_tile, q, o, m, l, k, v, keys, scale2);
            },
            load_q);
    }
    const float total[2] = {group_sum(l[0]), group_sum(l[1])};
    UNROLL
    for (u32 n = 0; n < HD / 8; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) o[n][i] /= total[i / 2];
    }
    const u64 at = blk.b * tokens * dim + blk.h * hd;
    mma_store<HD>(out, out16, at, dim, row0, tokens, hd, o, 1.0f);
    if (t == 0) {
        UNROLL
        for (u32 r = 0; r < 2; ++r) {
            const u64 i = row0 + lane / 4 + 8 * r;
            if (i < tokens) {
                lse[(blk.b * heads + blk.h) * tokens + i] = m[r] * scale + logf(total[r]);
            }
        }
    }
}

// out = softmax(scale * q k^T) v per (image, head), lse = log of each row's sum of exponentials;
// out16, where not null, receives out's bf16 copy (the input of `proj`, and O of the backward's
// Drow), and a null out leaves the copy alone holding it (out from `alloc_operand`). Every
// block of the grid in turn, with q, k, v read from `qkv` (floats, or the bf16 copy alone:
// bf16.rs). SPLIT: the tail blocks alone, one per (image, head) (`mma_block`), else the others.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_forward_grid(const Q* qkv, float* out, u16* out16, float* lse, u64 batch,
                                 u64 tokens, u64 heads, u64 hd, float scale, u32 flags) {
    MmaStaging& st = mma_staging();
    const u64 tiles = SPLIT ? mma_has_tail(tokens) : mma_row_tiles(tokens, flags);
    // The block functions use __syncthreads: every thread of a block runs every tile, so the
    // loop depends on the block alone (here and in the backward's grid functions).
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = mma_block<SPLIT>(g, tiles, heads, tokens);
        mma_forward_block<HD, SPLIT>(qkv, out, out16, lse, tokens, heads, (u32)hd, scale, blk,
                                     flags, (u16*)st.a, (u16*)st.b);
    }
}

// mma_forward_grid at the narrowest head width that holds `hd` (32 or 64), for the kernels
// that take both: the f32 one and the tail.
template <bool SPLIT, typename Q>
__device__ __forceinline__ void mma_forward_widths(const Q* qkv, float* out, u16* out16,
                                                   float* lse, u64 batch, u64 tokens, u64 heads,
                                                   u64 hd, float scale, u32 flags) {
    if (hd <= 32) {
        mma_forward_grid<32, SPLIT>(qkv, out, out16, lse, batch, tokens, heads, hd, scale, flags);
    } else {
        mma_forward_grid<64, SPLIT>(qkv, out, out16, lse, batch, tokens, heads, hd, scale, flags);
    }
}

// The forward on f32 qkv (`qkv16` unused), any head width up to 64.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4 + MMA_BLOCKS_DELTA)
    attention_forward_mma(const float* qkv, const u16* qkv16, float* out, u16* out16,
                          float* lse, u64 batch, u64 tokens, u64 heads, u64 hd, float scale,
                          u32 flags) {
    mma_forward_widths<false>(qkv, out, out16, lse, batch, tokens, heads, hd, scale, flags);
}

// The forward on qkv's bf16 copy alone (`qkv` unused), head widths up to 32 and up to 64.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 5 + MMA_BLOCKS_DELTA)
    attention_forward_mma_bf16_hd32(const float* qkv, const u16* qkv16, float* out, u16* out16,
                                    float* lse, u64 batch, u64 tokens, u64 heads, u64 hd,
                                    float scale, u32 flags) {
    mma_forward_grid<32, false>(qkv16, out, out16, lse, batch, tokens, heads, hd, scale, flags);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4 + MMA_BLOCKS_DELTA)
    attention_forward_mma_bf16_hd64(const float* qkv, const u16* qkv16, float* out, u16* out16,
                                    float* lse, u64 batch, u64 tokens, u64 heads, u64 hd,
                                    float scale, u32 flags) {
    mma_forward_grid<64, false>(qkv16, out, out16, lse, batch, tokens, heads, hd, scale, flags);
}

// Eight elements of a row as f32, from 16-byte aligned floats or bf16 values.
__device__ __forceinline__ void mma_load8(float* v, const float* p) {
    const float4 lo = *(const float4*)p, hi = *(const float4*)(p + 4);
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
    v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}
__device__ __forceinline__ void mma_load8(float* v, const u16* p) {
    const uint4 w = *(const uint4*)p;
    const u32 words[4] = {w.x, w.y, w.z, w.w};
    UNROLL
    for (u32 j = 0; j < 4; ++j) {
        v[2 * j] = __uint_as_float(words[j] << 16);
        v[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
    }
}

// This lane's share of dO_i . O_i over one row's `hd` features: features 8 t .. 8 t + 8, then
// 32 further, and so on, in order (the caller sums the group's four). `wide` (hd a multiple of
// 8, both rows `mma_rows_wide`): eight features a load of each, where one element a load took
// eight cache lines a load instruction; else one at a time, in the same order, so both ways
// give the same sum. dO and O are of one type: both floats, or both bf16 copies.
template <typename Q>
__device__ __forceinline__ float mma_row_dot(const Q* dout, const Q* out, u32 hd, bool wide) {
    const u32 t = threadIdx.x % 4;
    float acc = 0.0f;
    for (u32 c0 = 8 * t; c0 < hd; c0 += 32) {
        if (wide) {
            float a[8], b[8];
            mma_load8(a, dout + c0);
            mma_load8(b, out + c0);
            UNROLL
            for (u32 j = 0; j < 8; ++j) acc += a[j] * b[j];
        } else {
            for (u32 c = c0; c < c0 + 8 && c < hd; ++c) {
                acc += mma_value(dout[c]) * mma_value(out[c]);
            }
        }
    }
    return acc;
}

// One key tile of dQ for this warp's rows: p = exp(scale q_i . k_j - lse_i),
// ds = p (dO_i . v_j - Drow_i), dq += ds k_j on the tensor cores (li: lse_i in base 2). `keys`
// of the tile's keys are valid, within its first 16 STEPS; with MASK false all MMA_TILE are.
template <int HD, int STEPS, bool MASK>
__device__ __forceinline__ void mma_dq_tile(const u32 (*q)[4], const u32 (*dout)[4],
                                            float (*dq)[4], const float* d, const float* li,
                                            const u16* ks, const u16* vs, u32 keys,
                                            float scale2) {
    float s[2 * STEPS][4], dp[2 * STEPS][4];
    mma_scores<HD, STEPS>(s, q, ks);
    mma_scores<HD, STEPS>(dp, dout, vs);
    UNROLL
    for (u32 n = 0; n < 2 * STEPS; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) {
            float p = exp2_fast(fmaf(s[n][i], scale2, -li[i / 2]));
            if (MASK && mma_key_out(n, i, keys)) p = 0.0f;
            s[n][i] = p * (dp[n][i] - d[i / 2]);
        }
    }
    u32 ds[STEPS][4];
    mma_c_to_a<STEPS>(ds, s);
    mma_accumulate<HD, STEPS>(dq, ds, ks);
}

// dQ for one block: Drow_i = dO_i . O_i in f32, then the key tiles in turn; dq is scaled once
// at the end. Writes each row's (lse in base 2, Drow) for the dK, dV kernel.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_dq_block(const Q* qkv, const Q* out, const float* lse, const Q* d_out,
                             float* d_qkv, u16* d_qkv16, float2* stats, u64 tokens, u64 heads,
                             u32 hd, float scale, AttBlock blk, u32 flags, u16* ks,
                             u16* vs) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const u64 row0 = blk.row0 + (SPLIT ? 0 : 16 * (threadIdx.x / 32));
    const Q* base = qkv + blk.b * tokens * width + blk.h * hd;
    const bool wide = mma_kv_wide(base, dim, hd);
    auto stage = [&](u32 buf, u64 j0) {
        mma_stage_kv<HD>(ks + buf * MMA_BUF, vs + buf * MMA_BUF, base, dim, j0, tokens, hd, wide);
    };
    if (row0 >= tokens) {  // past the tokens: only helps stage
        mma_row_walk(tokens, flags, stage, [](u32, u64) {}, [] {});
        return;
    }
    const Q* dout_base = d_out + blk.b * tokens * dim + blk.h * hd;
    const Q* out_base = out + blk.b * tokens * dim + blk.h * hd;
    const u64 lbase = (blk.b * heads + blk.h) * tokens;
    const bool dot_wide = hd % 8 == 0 && mma_rows_wide(dout_base, dim, hd) &&
                          mma_rows_wide(out_base, dim, hd);
    float d[2], li[2];
    UNROLL
    for (u32 r = 0; r < 2; ++r) {
        const u64 i = row0 + g + 8 * r;
        const float acc =
            i < tokens ? mma_row_dot(dout_base + i * dim, out_base + i * dim, hd, dot_wide) : 0.0f;
        d[r] = group_sum(acc);
        li[r] = i < tokens ? lse[lbase + i] * LOG2E : 0.0f;  // base 2, as the exponents below
    }
    u32 q[HD / 16][4], dout[HD / 16][4];
    u16 *slot_q = mma_warp_slot<HD>(ks), *slot_do = mma_warp_slot<HD>(vs);
    auto load_rows = [&] {
        const bool q_staged = mma_issue_rows<HD>(slot_q, base, width, row0, tokens, hd);
        const bool do_staged = mma_issue_rows<HD>(slot_do, dout_base, dim, row0, tokens, hd);
        mma_take_rows<HD>(q, q_staged, slot_q, base, width, row0, tokens, hd);
        mma_take_rows<HD>(dout, do_staged, slot_do, dout_base, dim, row0, tokens, hd);
    };
    float dq[HD / 8][4];
    mma_zero<HD>(dq);
    const float scale2 = scale * LOG2E;
    if (SPLIT) {
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 j0) {
                const u32 keys = mma_slice(mma_stage_valid(j0, tokens));
                const u32 at = buf * MMA_BUF + mma_slice_at(HD + MMA_PAD);
                if (keys == 16) {
                    mma_dq_tile<HD, 1, false>(q, dout, dq, d, li, ks + at, vs + at, keys, scale2);
                } else if (keys > 0) {
                    mma_dq_tile<HD, 1, true>(q, dout, dq, d, li, ks + at, vs + at, keys, scale2);
                }
            },
            load_rows);
        __syncthreads();  // every warp is done with the staged tiles
        if (threadIdx.x >= 32) mma_share<HD>(dq, (float*)ks);
        __syncthreads();
        if (threadIdx.x >= 32) return;
        mma_add_shared<HD>(dq, (float*)ks);
    } else {
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 j0) {
                const u32 keys = mma_stage_valid(j0, tokens);
                const u16 *k = ks + buf * MMA_BUF, *v = vs + buf * MMA_BUF;
                MMA_BY_STEPS(keys, mma_dq_tile, q, dout, dq, d, li, k, v, keys, scale2);
            },
            load_rows);
    }
    const u64 at = blk.b * tokens * width + blk.h * hd;
    mma_store<HD>(d_qkv, d_qkv16, at, width, row0, tokens, hd, dq, scale);
    if (t == 0) {
        UNROLL
        for (u32 r = 0; r < 2; ++r) {
            const u64 i = row0 + g + 8 * r;
            if (i < tokens) stats[lbase + i] = make_float2(li[r], d[r]);
        }
    }
}

// Gradient of q into the q columns of d_qkv (overwritten), and the score rows' statistics
// `stats` [batch, heads, tokens] for the dK, dV kernel: (lse in base 2, Drow) as one float2, so
// that kernel stages a row's pair with one 8-byte `cp.async`. d_qkv16, where not null, receives
// those columns' bf16 copy (d_qkv is dY of the qkv Linear), and a null d_qkv leaves the copy
// alone holding them (d_qkv from `alloc_operand`). qkv, out and d_out are all floats or all
// bf16 copies alone (in the bf16 mode the qkv product's output, the attention's own output and
// the proj Linear's input gradient; ops.rs sees to that), so that one instantiation reads them;
// Drow then sums the products of the bf16 values of dO and O, as FlashAttention's bf16 kernels
// do. So nothing in the bf16 mode reads O's floats, and the forward stores its copy alone.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_dq_grid(const Q* qkv, const Q* out, const float* lse, const Q* d_out,
                            float* d_qkv, u16* d_qkv16, float2* stats, u64 batch, u64 tokens,
                            u64 heads, u64 hd, float scale, u32 flags) {
    MmaStaging& st = mma_staging();
    const u64 tiles = SPLIT ? mma_has_tail(tokens) : mma_row_tiles(tokens, flags);
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = mma_block<SPLIT>(g, tiles, heads, tokens);
        mma_dq_block<HD, SPLIT>(qkv, out, lse, d_out, d_qkv, d_qkv16, stats, tokens, heads,
                                (u32)hd, scale, blk, flags, (u16*)st.a, (u16*)st.b);
    }
}

// mma_dq_grid at the narrowest head width that holds `hd`, as mma_forward_widths.
template <bool SPLIT, typename Q>
__device__ __forceinline__ void mma_dq_widths(const Q* qkv, const Q* out, const float* lse,
                                              const Q* d_out, float* d_qkv, u16* d_qkv16,
                                              float2* stats, u64 batch, u64 tokens, u64 heads,
                                              u64 hd, float scale, u32 flags) {
    if (hd <= 32) {
        mma_dq_grid<32, SPLIT>(qkv, out, lse, d_out, d_qkv, d_qkv16, stats, batch, tokens, heads,
                               hd, scale, flags);
    } else {
        mma_dq_grid<64, SPLIT>(qkv, out, lse, d_out, d_qkv, d_qkv16, stats, batch, tokens, heads,
                               hd, scale, flags);
    }
}

// dQ on f32 qkv, O and dO (`qkv16`, `out16`, `d_out16` unused), any head width up to 64.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dq_mma(const float* qkv, const u16* qkv16, const float* out,
                              const u16* out16, const float* lse, const float* d_out,
                              const u16* d_out16, float* d_qkv, u16* d_qkv16, float2* stats,
                              u64 batch, u64 tokens, u64 heads, u64 hd, float scale, u32 flags) {
    mma_dq_widths<false>(qkv, out, lse, d_out, d_qkv, d_qkv16, stats, batch, tokens, heads, hd,
                         scale, flags);
}

// dQ on the bf16 copies alone (`qkv`, `out`, `d_out` unused), head widths up to 32 and up to
// 64.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4 + MMA_BLOCKS_DELTA)
    attention_backward_dq_mma_bf16_hd32(const float* qkv, const u16* qkv16, const float* out,
                                        const u16* out16, const float* lse, const float* d_out,
                                        const u16* d_out16, float* d_qkv, u16* d_qkv16,
                                        float2* stats, u64 batch, u64 tokens, u64 heads, u64 hd,
                                        float scale, u32 flags) {
    mma_dq_grid<32, false>(qkv16, out16, lse, d_out16, d_qkv, d_qkv16, stats, batch, tokens,
                           heads, hd, scale, flags);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dq_mma_bf16_hd64(const float* qkv, const u16* qkv16, const float* out,
                                        const u16* out16, const float* lse, const float* d_out,
                                        const u16* d_out16, float* d_qkv, u16* d_qkv16,
                                        float2* stats, u64 batch, u64 tokens, u64 heads, u64 hd,
                                        float scale, u32 flags) {
    mma_dq_grid<64, false>(qkv16, out16, lse, d_out16, d_qkv, d_qkv16, stats, batch, tokens,
                           heads, hd, scale, flags);
}

// One query tile of dK, dV for this warp's key rows: s^T = k q^T and dp^T = v dO^T on the
// tensor cores, p = exp(scale s - lse_i) per query column, dv += p^T dO, ds = p (dp - Drow_i),
// dk += ds^T q, over the tile's first 16 STEPS rows; `st` holds the tile's (lse_i in base 2,
// Drow_i). A query past `tokens` was staged as zeros, q, dO and its statistics alike: its score is
// 0 and p = 1, but dO = 0 makes both its dv term and dp, and with Drow = 0 its ds, exactly 0.
template <int HD, int STEPS>
__device__ __forceinline__ void mma_dkv_tile(const u32 (*k)[4], const u32 (*v)[4],
                                             float (*dk)[4], float (*dv)[4], const u16* qs,
                                             const u16* dos, const float2* st, float scale2) {
    const u32 t = threadIdx.x % 4;
    float s[2 * STEPS][4], dp[2 * STEPS][4];
    mma_scores<HD, STEPS>(s, k, qs);
    mma_scores<HD, STEPS>(dp, v, dos);
    UNROLL
    for (u32 n = 0; n < 2 * STEPS; ++n) {
        UNROLL
        for (u32 i = 0; i < 4; ++i) {
            const float2 row = st[8 * n + 2 * t + i % 2];
            const float p = exp2_fast(fmaf(s[n][i], scale2, -row.x));
            s[n][i] = p;
            dp[n][i] = p * (dp[n][i] - row.y);
        }
    }
    u32 pa[STEPS][4], dsa[STEPS][4];
    mma_c_to_a<STEPS>(pa, s);
    mma_c_to_a<STEPS>(dsa, dp);
    mma_accumulate<HD, STEPS>(dv, pa, dos);
    mma_accumulate<HD, STEPS>(dk, dsa, qs);
}

// The query tile at i0 of one head for the dK, dV kernel: q into `qs`, dO into `dos`, the rows'
// statistics into `st` (zeros past the rows), all by `cp.async` where the inputs are bf16.
// `base`, `dout_base` point at the head's q and dO columns in row 0, `stats` at its rows'.
template <int HD, typename Q>
__device__ __forceinline__ void mma_stage_q_do(u16* qs, u16* dos, float2* st, const Q* base,
                                               const Q* dout_base, const float2* stats, u64 dim,
                                               u64 i0, u64 tokens, u32 hd, bool wide) {
    mma_stage_rows<HD>(qs, base, 3 * dim, i0, tokens, hd, wide);
    mma_stage_rows<HD>(dos, dout_base, dim, i0, tokens, hd, wide);
    static_assert(MMA_THREADS >= MMA_TILE, "a thread per statistics row");
    const u32 r = threadIdx.x;
    if (r < MMA_TILE) {
        const bool in = i0 + r < tokens;
        cp_async<8>(st + r, in ? stats + i0 + r : stats, in);
    }
}

// dK, dV for one block, the warp's 16 key rows against the query tiles in turn; dk is scaled
// once at the end.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_dkv_block(const Q* qkv, const Q* d_out, const float2* stats, float* d_qkv,
                              u16* d_qkv16, u64 tokens, u64 heads, u32 hd, float scale,
                              AttBlock blk, u32 flags, u16* qs, u16* dos, float2* st) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u64 row0 = blk.row0 + (SPLIT ? 0 : 16 * (threadIdx.x / 32));
    const Q* base = qkv + blk.b * tokens * width + blk.h * hd;
    const Q* dout_base = d_out + blk.b * tokens * dim + blk.h * hd;
    const float2* head_stats = stats + (blk.b * heads + blk.h) * tokens;
    const bool wide = mma_rows_wide(base, 3 * dim, hd) && mma_rows_wide(dout_base, dim, hd);
    auto stage = [&](u32 buf, u64 i0) {
        mma_stage_q_do<HD>(qs + buf * MMA_BUF, dos + buf * MMA_BUF, st + buf * MMA_TILE, base,
                           dout_base, head_stats, dim, i0, tokens, hd, wide);
    };
    if (row0 >= tokens) {  // past the tokens: only helps stage
        mma_row_walk(tokens, flags, stage, [](u32, u64) {}, [] {});
        return;
    }
    const float scale2 = scale * LOG2E;
    u32 k[HD / 16][4], v[HD / 16][4];
    u16 *slot_k = mma_warp_slot<HD>(qs), *slot_v = mma_warp_slot<HD>(dos);
    auto load_rows = [&] {
        const bool k_staged = mma_issue_rows<HD>(slot_k, base + dim, width, row0, tokens, hd);
        const bool v_staged = mma_issue_rows<HD>(slot_v, base + 2 * dim, width, row0, tokens, hd);
        mma_take_rows<HD>(k, k_staged, slot_k, base + dim, width, row0, tokens, hd);
        mma_take_rows<HD>(v, v_staged, slot_v, base + 2 * dim, width, row0, tokens, hd);
    };
    float dk[HD / 8][4], dv[HD / 8][4];
    mma_zero<HD>(dk);
    mma_zero<HD>(dv);
    if (SPLIT) {
        // Each warp a 16-row slice of every query tile (and of its statistics).
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 i0) {
                const u32 at = buf * MMA_BUF + mma_slice_at(HD + MMA_PAD);
                const float2* sh = st + buf * MMA_TILE + 16 * (threadIdx.x / 32);
                if (mma_slice(mma_stage_valid(i0, tokens)) > 0) {
                    mma_dkv_tile<HD, 1>(k, v, dk, dv, qs + at, dos + at, sh, scale2);
                }
            },
            load_rows);
        __syncthreads();  // every warp is done with the staged tiles
        if (threadIdx.x >= 32) {
            mma_share<HD>(dk, (float*)qs);
            mma_share<HD>(dv, (float*)dos);
        }
        __syncthreads();
        if (threadIdx.x >= 32) return;
        mma_add_shared<HD>(dk, (float*)qs);
        mma_add_shared<HD>(dv, (float*)dos);
    } else {
        mma_row_walk(
            tokens, flags, stage,
            [&](u32 buf, u64 i0) {
                const u16 *q = qs + buf * MMA_BUF, *o = dos + buf * MMA_BUF;
                // The tile in halves of 32 query rows, each at the fewest k-steps that cover its
                // valid rows: a whole tile at once keeps 64 more score and gradient values live,
                // and at the 128 registers of four resident blocks ptxas 12.9 spilled inside the
                // loop.
                const u32 valid = mma_stage_valid(i0, tokens);
                UNROLL
                for (u32 h = 0; h < 2; ++h) {
                    const u32 rows = valid > 32 * h ? valid - 32 * h : 0;
                    const u16 *qh = q + 32 * h * (HD + MMA_PAD), *oh = o + 32 * h * (HD + MMA_PAD);
                    const float2* sh = st + buf * MMA_TILE + 32 * h;
                    if (rows > 16) {
                        mma_dkv_tile<HD, 2>(k, v, dk, dv, qh, oh, sh, scale2);
                    } else if (rows > 0) {
                        mma_dkv_tile<HD, 1>(k, v, dk, dv, qh, oh, sh, scale2);
                    }
                }
            },
            load_rows);
    }
    const u64 at = blk.b * tokens * width + blk.h * hd;
    mma_store<HD>(d_qkv, d_qkv16, at + dim, width, row0, tokens, hd, dk, scale);
    mma_store<HD>(d_qkv, d_qkv16, at + 2 * dim, width, row0, tokens, hd, dv, 1.0f);
}

// Gradients of k and v into the k and v columns of d_qkv (overwritten), given the dQ kernel's
// row statistics; qkv, d_out and d_qkv16 as in the dQ kernel.
template <int HD, bool SPLIT, typename Q>
__device__ void mma_dkv_grid(const Q* qkv, const Q* d_out, const float2* stats, float* d_qkv,
                             u16* d_qkv16, u64 batch, u64 tokens, u64 heads, u64 hd, float scale,
                             u32 flags) {
    MmaStaging& st = mma_staging();
    MmaRowStats& rs = mma_row_stats();
    const u64 tiles = SPLIT ? mma_has_tail(tokens) : mma_row_tiles(tokens, flags);
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = mma_block<SPLIT>(g, tiles, heads, tokens);
        mma_dkv_block<HD, SPLIT>(qkv, d_out, stats, d_qkv, d_qkv16, tokens, heads, (u32)hd,
                                 scale, blk, flags, (u16*)st.a, (u16*)st.b, rs.stats);
    }
}

// mma_dkv_grid at the narrowest head width that holds `hd`, as mma_forward_widths.
template <bool SPLIT, typename Q>
__device__ __forceinline__ void mma_dkv_widths(const Q* qkv, const Q* d_out, const float2* stats,
                                               float* d_qkv, u16* d_qkv16, u64 batch, u64 tokens,
                                               u64 heads, u64 hd, float scale, u32 flags) {
    if (hd <= 32) {
        mma_dkv_grid<32, SPLIT>(qkv, d_out, stats, d_qkv, d_qkv16, batch, tokens, heads, hd,
                                scale, flags);
    } else {
        mma_dkv_grid<64, SPLIT>(qkv, d_out, stats, d_qkv, d_qkv16, batch, tokens, heads, hd,
                                scale, flags);
    }
}

// dK, dV on f32 qkv and dO (`qkv16`, `d_out16` unused), any head width up to 64.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dkv_mma(const float* qkv, const u16* qkv16, const float* d_out,
                               const u16* d_out16, const float2* stats, float* d_qkv,
                               u16* d_qkv16, u64 batch, u64 tokens, u64 heads, u64 hd,
                               float scale, u32 flags) {
    mma_dkv_widths<false>(qkv, d_out, stats, d_qkv, d_qkv16, batch, tokens, heads, hd, scale,
                          flags);
}

// dK, dV on the bf16 copies alone (`qkv`, `d_out` unused), head widths up to 32 and up to 64.
// Four blocks at width 32 (128 registers, no spill in the main loop since the tiles go in
// halves); at 64 four spilled 20 values a tile, so three.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4 + MMA_BLOCKS_DELTA)
    attention_backward_dkv_mma_bf16_hd32(const float* qkv, const u16* qkv16, const float* d_out,
                                         const u16* d_out16, const float2* stats, float* d_qkv,
                                         u16* d_qkv16, u64 batch, u64 tokens, u64 heads, u64 hd,
                                         float scale, u32 flags) {
    mma_dkv_grid<32, false>(qkv16, d_out16, stats, d_qkv, d_qkv16, batch, tokens, heads, hd,
                            scale, flags);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dkv_mma_bf16_hd64(const float* qkv, const u16* qkv16, const float* d_out,
                                         const u16* d_out16, const float2* stats, float* d_qkv,
                                         u16* d_qkv16, u64 batch, u64 tokens, u64 heads, u64 hd,
                                         float scale, u32 flags) {
    mma_dkv_grid<64, false>(qkv16, d_out16, stats, d_qkv, d_qkv16, batch, tokens, heads, hd,
                            scale, flags);
}

// The tail kernels: the last block of each (image, head) where its rows fit in one warp
// (`mma_has_tail`; nothing otherwise), its tiles split over the four warps, after the main
// kernel of the same direction has run the other blocks (with MMA_SPLIT). The same parameters
// as the main kernels; q, k, v (and O, dO) come from the bf16 copies alone where those are given
// (`qkv16` not null), else from the floats, at either head width. A block's work is a quarter
// of a main block's, so the four paths sharing one register allocation cost little.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_forward_mma_tail(const float* qkv, const u16* qkv16, float* out, u16* out16,
                               float* lse, u64 batch, u64 tokens, u64 heads, u64 hd, float scale,
                               u32 flags) {
    if (qkv16 != nullptr) {
        mma_forward_widths<true>(qkv16, out, out16, lse, batch, tokens, heads, hd, scale, flags);
    } else {
        mma_forward_widths<true>(qkv, out, out16, lse, batch, tokens, heads, hd, scale, flags);
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dq_mma_tail(const float* qkv, const u16* qkv16, const float* out,
                                   const u16* out16, const float* lse, const float* d_out,
                                   const u16* d_out16, float* d_qkv, u16* d_qkv16,
                                   float2* stats, u64 batch, u64 tokens, u64 heads, u64 hd,
                                   float scale, u32 flags) {
    if (qkv16 != nullptr) {
        mma_dq_widths<true>(qkv16, out16, lse, d_out16, d_qkv, d_qkv16, stats, batch, tokens,
                            heads, hd, scale, flags);
    } else {
        mma_dq_widths<true>(qkv, out, lse, d_out, d_qkv, d_qkv16, stats, batch, tokens, heads,
                            hd, scale, flags);
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 3 + MMA_BLOCKS_DELTA)
    attention_backward_dkv_mma_tail(const float* qkv, const u16* qkv16, const float* d_out,
                                    const u16* d_out16, const float2* stats, float* d_qkv,
                                    u16* d_qkv16, u64 batch, u64 tokens, u64 heads, u64 hd,
                                    float scale, u32 flags) {
    if (qkv16 != nullptr) {
        mma_dkv_widths<true>(qkv16, d_out16, stats, d_qkv, d_qkv16, batch, tokens, heads, hd,
                             scale, flags);
    } else {
        mma_dkv_widths<true>(qkv, d_out, stats, d_qkv, d_qkv16, batch, tokens, heads, hd, scale,
                             flags);
    }
}
