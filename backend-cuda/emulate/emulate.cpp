// Runs every kernel of ../src/kernels on the host (shim.h) with the grids and argument lists
// that ../src/ops.rs uses, and compares the results with naive references written from the
// trait's contract (mae/src/backend.rs). A development check for machines without a GPU: it
// finds wrong index arithmetic, reduction trees and barriers, not GPU-specific faults.
// Build and run: backend-cuda/emulate/run.sh
#include "shim.h"

#include "../src/kernels/prelude.cuh"
#include "../src/kernels/elementwise.cu"
#include "../src/kernels/rows.cu"
#include "../src/kernels/norm.cu"
#include "../src/kernels/softmax.cu"
#include "../src/kernels/loss.cu"
#include "../src/kernels/attention.cu"
#include "../src/kernels/attention_mma.cu"

#include <cstdio>
#include <random>
#include <string>

static int failures = 0, checks = 0;
static std::mt19937_64 rng(1234);

static std::vector<float> random_vec(size_t n, float lo = -2.0f, float hi = 2.0f) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

static std::vector<float> int_vec(size_t n) {
    std::uniform_int_distribution<int> d(-8, 8);
    std::vector<float> v(n);
    for (auto& x : v) x = (float)d(rng);
    return v;
}

// |got - want| <= tol * max(1, |want|) everywhere (tol 0: bitwise, NaN matching NaN).
static void expect_close(const std::string& what, const std::vector<float>& got,
                         const std::vector<double>& want, double tol) {
    ++checks;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = got[i], w = want[i];
        const bool ok = (std::isnan(g) && std::isnan(w)) ||
                        std::fabs(g - w) <= tol * std::fmax(1.0, std::fabs(w));
        if (!ok) {
            std::printf("FAIL %s: element %zu got %.9g want %.9g\n", what.c_str(), i, g, w);
            ++failures;
            return;
        }
    }
}

static uint16_t nearest_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint32_t down = u & 0xffff0000u, up = down + 0x10000u;
    float fd, fu;
    std::memcpy(&fd, &down, 4);
    std::memcpy(&fu, &up, 4);
    // Above the largest bf16 the upper neighbour is 2^128 with an unbounded exponent, which
    // rounds to infinity.
    const double fu_d = (up & 0x7fffffffu) == 0x7f800000u ? std::copysign(std::ldexp(1.0, 128), x) : fu;
    const double dd = std::fabs((double)x - fd), du = std::fabs((double)x - fu_d);
    if (dd < du || (dd == du && ((down >> 16) & 1u) == 0)) return (uint16_t)(down >> 16);
    return (uint16_t)(up >> 16);
}

// The bf16 copy that a kernel wrote beside its f32 output `f`: each element f's nearest bf16.
static void expect_bf16_copy(const std::string& what, const std::vector<uint16_t>& copy,
                             const std::vector<float>& f) {
    ++checks;
    for (size_t i = 0; i < f.size(); ++i) {
        if (copy[i] != nearest_bf16(f[i])) {
            std::printf("FAIL %s: element %zu is 0x%04x, the nearest bf16 of %.9g is 0x%04x\n",
                        what.c_str(), i, copy[i], f[i], nearest_bf16(f[i]));
            ++failures;
            return;
        }
    }
}

static std::vector<double> to_d(const std::vector<float>& v) {
    return std::vector<double>(v.begin(), v.end());
}

// The grids of ../src/launch.rs.
static const unsigned BLOCKS_MAX = 1u << 16;
static unsigned grid_elementwise(u64 n) { return (unsigned)std::min<u64>((n + 255) / 256, BLOCKS_MAX); }
static unsigned grid_rows(u64 rows) { return (unsigned)std::min<u64>(rows, BLOCKS_MAX); }
static u64 chunks_of(u64 rows) { return std::max<u64>((rows + 31) / 32, 1); }

// Each case runs with the production grid and with a small one (grid-stride loops).
static std::vector<unsigned> grids(unsigned production) {
    if (production <= 1) return {production};
    return {production, 1};
}

static void test_elementwise() {
    // 1000: a multiple of eight, for the GELU kernels' eight-at-a-time path.
    for (u64 n : {1ull, 255ull, 700ull, 1000ull}) {
        for (unsigned g : grids(grid_elementwise(n))) {
            std::string tag = " n=" + std::to_string(n) + " grid=" + std::to_string(g);
            auto x = random_vec(n, -6, 6), y = random_vec(n), dx = random_vec(n), dy = random_vec(n);
            std::vector<float> buf = x;
            launch(g, 256, [&] { fill_f32(buf.data(), n, 0.5f); });
            expect_close("fill" + tag, buf, std::vector<double>(n, 0.5), 0);
            buf = y;
            launch(g, 256, [&] { add_f32(x.data(), buf.data(), n); });
            std::vector<double> want(n);
            for (u64 i = 0; i < n; ++i) want[i] = (float)(y[i] + x[i]);
            expect_close("add" + tag, buf, want, 0);
            // Three partials summed onto beta times dst, and over it (beta 0 never reads the
            // NaN there); with a second sum of nb elements (a bias's partials) in the same
            // launch, or none.
            for (float beta : {0.0f, 1.0f, 0.5f}) {
                for (u64 nb : {0ull, 1ull, 37ull}) {
                    std::vector<float> parts = random_vec(3 * n), parts_b = random_vec(3 * nb);
                    std::vector<float> bias = random_vec(nb), got_b = bias;
                    buf = beta == 0.0f ? std::vector<float>(n, NAN) : y;
                    launch(g, 256, [&] {
                        sum_partials_f32(parts.data(), buf.data(), n, beta, parts_b.data(),
                                         got_b.data(), nb, 1.0f, 3);
                    });
                    for (u64 i = 0; i < n; ++i) {
                        const double old = beta == 0.0f ? 0.0 : (double)beta * y[i];
                        want[i] = (float)(old + parts[i] + parts[n + i] + parts[2 * n + i]);
                    }
                    std::vector<double> want_b(nb);
                    for (u64 i = 0; i < nb; ++i)
                        want_b[i] = (float)((double)bias[i] + parts_b[i] + parts_b[nb + i] +
                                            parts_b[2 * nb + i]);
                    const std::string t =
                        " beta=" + std::to_string(beta) + " nb=" + std::to_string(nb) + tag;
                    expect_close("sum_partials" + t, buf, want, 0);
                    expect_close("sum_partials bias" + t, got_b, want_b, 0);
                }
            }
            buf = y;
            launch(g, 256, [&] { scale_f32(buf.data(), n, -1.5f); });
            for (u64 i = 0; i < n; ++i) want[i] = (float)(y[i] * -1.5f);
            expect_close("scale" + tag, buf, want, 0);
            buf.assign(n, NAN);
            // The f64 kernels without a bf16 copy (null), the f32 ones with one.
            std::vector<uint16_t> copy(n, 0xdead);
            launch(g, 256, [&] { gelu_forward(x.data(), nullptr, buf.data(), nullptr, n); });
            for (u64 i = 0; i < n; ++i) want[i] = 0.5 * x[i] * (1.0 + std::erf(x[i] / std::sqrt(2.0)));
            expect_close("gelu_forward" + tag, buf, want, 1e-6);
            buf.assign(n, NAN);
            launch(g, 256, [&] { gelu_forward_f32(x.data(), nullptr, buf.data(), copy.data(), n); });
            expect_close("gelu_forward_f32" + tag, buf, want, 1e-6);
            expect_bf16_copy("gelu_forward_f32 copy" + tag, copy, buf);
            {
                // The copy alone (null y, bf16.rs `skip_floats`), alone and after a bias.
                std::vector<uint16_t> alone(n, 0xdead);
                launch(g, 256, [&] { gelu_forward_f32(x.data(), nullptr, nullptr, alone.data(), n); });
                ++checks;
                if (alone != copy) {
                    std::printf("FAIL gelu_forward_f32 with a null y%s\n", tag.c_str());
                    ++failures;
                }
                const u64 cols = 7;
                auto bias = random_vec(cols);
                std::vector<float> pre1 = x, pre2 = x, act(n, NAN);
                std::vector<uint16_t> act16(n, 0xdead), alone16(n, 0xdead);
                launch(g, 256, [&] { bias_gelu_forward_f32(bias.data(), pre1.data(), act.data(), act16.data(), n, cols); });
                launch(g, 256, [&] { bias_gelu_forward_f32(bias.data(), pre2.data(), nullptr, alone16.data(), n, cols); });
                ++checks;
                if (alone16 != act16 || std::memcmp(pre1.data(), pre2.data(), n * 4)) {
                    std::printf("FAIL bias_gelu_forward_f32 with a null act%s\n", tag.c_str());
                    ++failures;
                }
            }
            buf = dx;
            launch(g, 256, [&] { gelu_backward(x.data(), nullptr, dy.data(), nullptr, buf.data(), nullptr, n, 1); });
            for (u64 i = 0; i < n; ++i) {
                const double v = x[i], h = 1e-5;
                auto gelu = [](double t) { return 0.5 * t * (1.0 + std::erf(t / std::sqrt(2.0))); };
                want[i] = dx[i] + dy[i] * (gelu(v + h) - gelu(v - h)) / (2 * h);
            }
            expect_close("gelu_backward" + tag, buf, want, 1e-6);
            buf = dx;
            copy.assign(n, 0xdead);
            launch(g, 256, [&] { gelu_backward_f32(x.data(), nullptr, dy.data(), nullptr, buf.data(), copy.data(), n, 1); });
            expect_close("gelu_backward_f32" + tag, buf, want, 1e-6);
            expect_bf16_copy("gelu_backward_f32 copy" + tag, copy, buf);
            {
                // Overwriting into the copy alone (null dx, bf16.rs `skip_floats`): the copy
                // of the overwriting kernel's floats.
                std::vector<float> floats(n, NAN);
                std::vector<uint16_t> with(n, 0xdead), alone(n, 0xdead);
                launch(g, 256, [&] { gelu_backward_f32(x.data(), nullptr, dy.data(), nullptr, floats.data(), with.data(), n, 0); });
                launch(g, 256, [&] { gelu_backward_f32(x.data(), nullptr, dy.data(), nullptr, nullptr, alone.data(), n, 0); });
                ++checks;
                if (alone != with) {
                    std::printf("FAIL gelu_backward_f32 with a null dx%s\n", tag.c_str());
                    ++failures;
                }
            }
            {
                // Inputs held as bf16 copies alone (x16, dy16; bf16.rs `copy_alone`): bitwise
                // the kernels on floats holding the same values, four at a time or not.
                std::vector<uint16_t> x16(n), dy16(n);
                std::vector<float> xw(n), dyw(n);
                for (u64 i = 0; i < n; ++i) {
                    x16[i] = (uint16_t)bf16_bits(x[i]);
                    dy16[i] = (uint16_t)bf16_bits(dy[i]);
                    xw[i] = __uint_as_float((unsigned)x16[i] << 16);
                    dyw[i] = __uint_as_float((unsigned)dy16[i] << 16);
                }
                std::vector<float> from16(n, NAN), fromf(n, NAN), gd16 = dx, gdf = dx;
                launch(g, 256, [&] { gelu_forward_f32(nullptr, x16.data(), from16.data(), nullptr, n); });
                launch(g, 256, [&] { gelu_forward_f32(xw.data(), nullptr, fromf.data(), nullptr, n); });
                std::vector<float> f64_16(n, NAN), f64_f(n, NAN);
                launch(g, 256, [&] { gelu_forward(nullptr, x16.data(), f64_16.data(), nullptr, n); });
                launch(g, 256, [&] { gelu_forward(xw.data(), nullptr, f64_f.data(), nullptr, n); });
                launch(g, 256, [&] {
                    gelu_backward_f32(nullptr, x16.data(), nullptr, dy16.data(), gd16.data(), nullptr, n, 1);
                });
                launch(g, 256, [&] {
                    gelu_backward_f32(xw.data(), nullptr, dyw.data(), nullptr, gdf.data(), nullptr, n, 1);
                });
                std::vector<float> b64_16 = dx, b64_f = dx;
                launch(g, 256, [&] {
                    gelu_backward(nullptr, x16.data(), nullptr, dy16.data(), b64_16.data(), nullptr, n, 1);
                });
                launch(g, 256, [&] {
                    gelu_backward(xw.data(), nullptr, dyw.data(), nullptr, b64_f.data(), nullptr, n, 1);
                });
                // Copies in and copies out alone (the bf16 mode's MLP; eight at a time where n
                // is a multiple of 8): the copies the kernels write beside floats.
                std::vector<uint16_t> fa(n, 0xdead), fw(n, 0xdead), ba(n, 0xdead), bw(n, 0xdead);
                std::vector<float> ff(n, NAN), bf(n, NAN);
                launch(g, 256, [&] { gelu_forward_f32(nullptr, x16.data(), nullptr, fa.data(), n); });
                launch(g, 256, [&] { gelu_forward_f32(nullptr, x16.data(), ff.data(), fw.data(), n); });
                launch(g, 256, [&] {
                    gelu_backward_f32(nullptr, x16.data(), nullptr, dy16.data(), nullptr, ba.data(), n, 0);
                });
                launch(g, 256, [&] {
                    gelu_backward_f32(nullptr, x16.data(), nullptr, dy16.data(), bf.data(), bw.data(), n, 0);
                });
                checks += 2;
                if (fa != fw) {
                    std::printf("FAIL gelu_forward_f32 from and into copies alone%s\n", tag.c_str());
                    ++failures;
                }
                if (ba != bw) {
                    std::printf("FAIL gelu_backward_f32 from and into copies alone%s\n", tag.c_str());
                    ++failures;
                }
                const std::pair<const char*, std::pair<std::vector<float>*, std::vector<float>*>> pairs[] = {
                    {"gelu_forward_f32", {&from16, &fromf}},
                    {"gelu_forward", {&f64_16, &f64_f}},
                    {"gelu_backward_f32", {&gd16, &gdf}},
                    {"gelu_backward", {&b64_16, &b64_f}},
                };
                for (const auto& [name, vs] : pairs) {
                    ++checks;
                    if (std::memcmp(vs.first->data(), vs.second->data(), n * sizeof(float)) != 0) {
                        std::printf("FAIL %s reading bf16 inputs%s\n", name, tag.c_str());
                        ++failures;
                    }
                }
            }
            // Overwriting (accumulate 0) never reads dx, here NaN, and gives bitwise the
            // accumulation into zeros; dy holds zeros of both signs, so the sign of zero counts.
            std::vector<float> dy0 = dy;
            for (u64 i = 0; i < n; i += 3) dy0[i] = (i % 2) ? -0.0f : 0.0f;
            for (int f32 = 0; f32 < 2; ++f32) {
                std::vector<float> zeroed(n, 0.0f), fresh(n, NAN);
                auto run = [&](std::vector<float>& out, unsigned acc) {
                    launch(g, 256, [&] {
                        if (f32) gelu_backward_f32(x.data(), nullptr, dy0.data(), nullptr, out.data(), nullptr, n, acc);
                        else gelu_backward(x.data(), nullptr, dy0.data(), nullptr, out.data(), nullptr, n, acc);
                    });
                };
                run(zeroed, 1);
                run(fresh, 0);
                ++checks;
                if (std::memcmp(zeroed.data(), fresh.data(), n * sizeof(float)) != 0) {
                    std::printf("FAIL gelu_backward%s overwriting is not the accumulation into "
                                "zeros%s\n", f32 ? "_f32" : "", tag.c_str());
                    ++failures;
                }
            }

            // AdamW, f32 as the CPU reference (bitwise: same operations, no contraction).
            auto p = random_vec(n), gr = random_vec(n), m = random_vec(n), v = random_vec(n, 0, 1);
            const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.05f, bc1 = 0.19f, bc2 = 0.0975f;
            std::vector<float> pp = p, mm = m, vv = v;
            launch(g, 256, [&] {
                adamw(pp.data(), gr.data(), mm.data(), vv.data(), n, 1.0f - lr * wd, b1, b2,
                      1.0f - b1, 1.0f - b2, lr / bc1, sqrtf(bc2), eps);
            });
            std::vector<double> wp(n), wm(n), wv(n);
            for (u64 i = 0; i < n; ++i) {
                float pi = p[i] * (1.0f - lr * wd);
                const float mi = b1 * m[i] + (1.0f - b1) * gr[i];
                const float vi = b2 * v[i] + (1.0f - b2) * gr[i] * gr[i];
                pi -= (lr / bc1) * mi / (sqrtf(vi) / sqrtf(bc2) + eps);
                wp[i] = pi, wm[i] = mi, wv[i] = vi;
            }
            expect_close("adamw param" + tag, pp, wp, 0);
            expect_close("adamw m" + tag, mm, wm, 0);
            expect_close("adamw v" + tag, vv, wv, 0);
        }
    }
}

// adamw_many: one launch over a table of tensors (lengths 0, 1, across chunk boundaries), some
// training with their own constants, some only zeroing their gradient; bitwise equal to adamw
// and fill_f32 per tensor, with the production grid and with a single block (grid stride).
// Every other training tensor has a bf16 copy to refresh: round_to_bf16 of the new values.
static void test_adamw_many() {
    struct Tensor {
        std::vector<float> p, g, m, v;
        bool trains;
        float lr, wd;
    };
    const u64 lens[] = {700, 0, 1, 1024, 1025, 3000, 255, 0};
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, bc1 = 0.19f, bc2 = 0.0975f;
    std::vector<Tensor> base;
    for (size_t k = 0; k < std::size(lens); ++k) {
        const u64 n = lens[k];
        base.push_back({random_vec(n), random_vec(n), random_vec(n), random_vec(n, 0, 1), k % 3 != 2,
                        1e-3f * (float)(k + 1), k % 2 ? 0.05f : 0.0f});
    }
    // The composition, per tensor.
    std::vector<Tensor> want = base;
    for (auto& t : want) {
        const u64 n = t.g.size();
        if (t.trains && n > 0) {
            launch(grid_elementwise(n), 256, [&] {
                adamw(t.p.data(), t.g.data(), t.m.data(), t.v.data(), n, 1.0f - t.lr * t.wd, b1, b2,
                      1.0f - b1, 1.0f - b2, t.lr / bc1, sqrtf(bc2), eps);
            });
        }
        if (n > 0) launch(grid_elementwise(n), 256, [&] { fill_f32(t.g.data(), n, 0.0f); });
    }
    auto bits = [](float x) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        return (u64)u;
    };
    u64 chunks = 0;
    for (u64 n : lens) chunks += (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
    for (unsigned g : grids((unsigned)chunks)) {
        std::vector<Tensor> got = base;
        std::vector<u64> table;
        std::vector<std::vector<uint16_t>> copies(got.size());
        u64 first = 0;
        for (size_t k = 0; k < got.size(); ++k) {
            auto& t = got[k];
            const u64 n = t.g.size();
            const float scalars[8] = {1.0f - t.lr * t.wd, b1, b2, 1.0f - b1, 1.0f - b2, t.lr / bc1,
                                      sqrtf(bc2), eps};
            table.insert(table.end(), {(u64)t.p.data(), (u64)t.g.data(), (u64)t.m.data(),
                                       (u64)t.v.data(), n, first, (u64)t.trains});
            for (float x : scalars) table.push_back(t.trains ? bits(x) : 0);
            // Room for round_to_bf16's pairs (an odd length's last high half stays 0xdead).
            if (t.trains && k % 2 == 0) copies[k].assign(n + n % 2, 0xdead);
            table.push_back(copies[k].empty() ? 0 : (u64)copies[k].data());
            first += (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
        }
        launch(g, 256, [&] { adamw_many(table.data(), got.size(), chunks); });
        for (size_t k = 0; k < got.size(); ++k) {
            const std::string tag = " tensor " + std::to_string(k) + " grid=" + std::to_string(g);
            if (!copies[k].empty()) {
                const u64 n = want[k].p.size();
                std::vector<uint32_t> pairs((n + 1) / 2);
                launch(grid_elementwise(n), 256, [&] { round_to_bf16(want[k].p.data(), pairs.data(), n); });
                ++checks;
                for (u64 i = 0; i < n; ++i) {
                    const uint16_t rounded = (uint16_t)(i % 2 ? pairs[i / 2] >> 16 : pairs[i / 2] & 0xffffu);
                    if (copies[k][i] != rounded) {
                        std::printf("FAIL adamw_many copy%s: element %llu is 0x%04x, round_to_bf16 0x%04x\n",
                                    tag.c_str(), (unsigned long long)i, copies[k][i], rounded);
                        ++failures;
                        break;
                    }
                }
            }
            expect_close("adamw_many param" + tag, got[k].p, to_d(want[k].p), 0);
            expect_close("adamw_many grad" + tag, got[k].g, to_d(want[k].g), 0);
            expect_close("adamw_many m" + tag, got[k].m, to_d(want[k].m), 0);
            expect_close("adamw_many v" + tag, got[k].v, to_d(want[k].v), 0);
        }
    }
}

// scale_rows: one factor per group of rows_per_scale * cols elements (drop path's 0 or
// 1 / keep_prob per image), overwriting (old NaN must not leak) or accumulating; bitwise, since
// each element is one f32 product and at most one f32 sum.
static void test_scale_rows() {
    struct Case { u64 scales, rows_per_scale, cols; };
    for (Case c : {Case{1, 1, 1}, Case{3, 2, 5}, Case{4, 3, 70}, Case{2, 197, 3}}) {
        const u64 group = c.rows_per_scale * c.cols, n = c.scales * group;
        for (unsigned g : grids(grid_elementwise(n))) {
            std::string tag = " scales=" + std::to_string(c.scales) + " rows_per_scale=" +
                              std::to_string(c.rows_per_scale) + " cols=" + std::to_string(c.cols) +
                              " grid=" + std::to_string(g);
            auto src = random_vec(n), prior = random_vec(n);
            std::vector<float> scales(c.scales);
            const float factors[] = {0.0f, 1.0f / 0.9f, -2.5f, 1.0f};
            for (u64 k = 0; k < c.scales; ++k) scales[k] = factors[k % 4];
            for (u32 acc : {0u, 1u}) {
                std::vector<float> dst = acc ? prior : std::vector<float>(n, NAN);
                launch(g, 256, [&] {
                    scale_rows(src.data(), scales.data(), dst.data(), n, group, acc);
                });
                std::vector<double> want(n);
                for (u64 i = 0; i < n; ++i) {
                    const float v = src[i] * scales[i / group];
                    want[i] = acc ? (float)(prior[i] + v) : v;
                }
                expect_close(std::string("scale_rows") + (acc ? " +=" : " =") + tag, dst, want, 0);
            }
        }
    }
}

// bias_gelu_forward: pre += bias per row (the f32 add, bitwise), act = gelu(pre) against the
// erf definition, and bitwise the copy_rows + gelu_forward pair it replaces. Rows of 1, 3 and 70
// columns put column wrap-arounds inside and across warps and blocks.
static void test_bias_gelu() {
    struct Case { u64 rows, cols; };
    for (Case c : {Case{1, 1}, Case{3, 5}, Case{7, 70}, Case{197, 3}, Case{2, 300}}) {
        const u64 n = c.rows * c.cols;
        for (unsigned g : grids(grid_elementwise(n))) {
            std::string tag = " rows=" + std::to_string(c.rows) + " cols=" +
                              std::to_string(c.cols) + " grid=" + std::to_string(g);
            auto bias = random_vec(c.cols), pre0 = random_vec(n, -4, 4);
            std::vector<float> pre = pre0, act(n, NAN);
            std::vector<uint16_t> copy(n, 0xdead);
            launch(g, 256, [&] { bias_gelu_forward(bias.data(), pre.data(), act.data(), copy.data(), n, c.cols); });
            std::vector<double> want_pre(n), want_act(n);
            for (u64 i = 0; i < n; ++i) {
                const float p = pre0[i] + bias[i % c.cols];
                want_pre[i] = p;
                want_act[i] = 0.5 * p * (1.0 + std::erf(p / std::sqrt(2.0)));
            }
            expect_close("bias_gelu_forward pre" + tag, pre, want_pre, 0);
            expect_close("bias_gelu_forward act" + tag, act, want_act, 1e-6);
            expect_bf16_copy("bias_gelu_forward act copy" + tag, copy, act);
            std::vector<float> pre32 = pre0, act32(n, NAN);
            launch(g, 256, [&] { bias_gelu_forward_f32(bias.data(), pre32.data(), act32.data(), nullptr, n, c.cols); });
            expect_close("bias_gelu_forward_f32 pre" + tag, pre32, want_pre, 0);
            expect_close("bias_gelu_forward_f32 act" + tag, act32, want_act, 1e-6);

            std::vector<float> two_pre = pre0, two_act(n, NAN);
            launch(g, 256, [&] {
                copy_rows(bias.data(), two_pre.data(), c.rows, 1, c.cols, 0, 0, 0, 1, 0, 1);
            });
            launch(g, 256, [&] { gelu_forward(two_pre.data(), nullptr, two_act.data(), nullptr, n); });
            expect_close("bias_gelu_forward pre vs copy_rows" + tag, pre, to_d(two_pre), 0);
            expect_close("bias_gelu_forward act vs gelu_forward" + tag, act, to_d(two_act), 0);
        }
    }
}

struct Map {
    u64 batch, count, cols, src_stride, src_start, src_step, dst_stride, dst_start;
    u64 src_row(u64 b, u64 i) const { return b * src_stride + src_start + i * src_step; }
    u64 dst_row(u64 b, u64 i) const { return b * dst_stride + dst_start + i; }
    u64 src_len() const {
        const u64 b = batch - 1, i = count - 1;
        return (std::max(src_row(b, i), src_row(b, 0)) + 1) * cols;
    }
    u64 dst_len() const { return (dst_row(batch - 1, count - 1) + 1) * cols; }
};

static u64 max_readers(const Map& m) {
    if (m.src_step == 0) return m.src_stride == 0 ? m.batch * m.count : m.count;
    if (m.src_stride == 0) return m.batch;
    return std::min(m.batch, (m.count - 1) / m.src_stride + 1);
}

static void test_copy_rows() {
    int maps = 0;
    for (u64 step : {0ull, 1ull})
        for (u64 stride : {0ull, 1ull, 2ull, 3ull, 5ull})
            for (auto bc : std::vector<std::pair<u64, u64>>{{1, 1}, {3, 2}, {4, 5}, {40, 3}, {2, 70}})
                for (u64 cols : {1ull, 3ull, 300ull}) {
                    const Map m{bc.first, bc.second, cols, stride, 1, step, bc.second + 1, 1};
                    ++maps;
                    const u64 ls = m.src_len(), ld = m.dst_len(), n = m.batch * m.count * cols;
                    std::string tag = " step=" + std::to_string(step) + " stride=" +
                                      std::to_string(stride) + " batch=" + std::to_string(m.batch) +
                                      " count=" + std::to_string(m.count) + " cols=" + std::to_string(cols);
                    auto src = int_vec(ls), dst0 = int_vec(ld);
                    for (unsigned acc : {0u, 1u}) {
                        std::vector<float> dst = dst0;
                        launch(grid_elementwise(n), 256, [&] {
                            copy_rows(src.data(), dst.data(), m.batch, m.count, m.cols, m.src_stride,
                                      m.src_start, m.src_step, m.dst_stride, m.dst_start, acc);
                        });
                        std::vector<double> want = to_d(dst0);
                        for (u64 b = 0; b < m.batch; ++b)
                            for (u64 i = 0; i < m.count; ++i)
                                for (u64 c = 0; c < cols; ++c) {
                                    const double v = src[m.src_row(b, i) * cols + c];
                                    double& o = want[m.dst_row(b, i) * cols + c];
                                    o = acc ? o + v : v;
                                }
                        expect_close("copy_rows acc=" + std::to_string(acc) + tag, dst, want, 0);
                    }
                    // Backward: integer data, so every order of summation is exact.
                    auto d_dst = int_vec(ld), d_src0 = int_vec(ls);
                    const u64 src_rows = ls / cols, chunks = chunks_of(max_readers(m));
                    std::vector<double> partial(chunks * src_rows * cols, NAN);
                    std::vector<float> d_src = d_src0;
                    launch(grid_elementwise(chunks * src_rows * cols), 256, [&] {
                        copy_rows_backward_partials(d_dst.data(), partial.data(), m.batch, m.count,
                                                    m.cols, m.src_stride, m.src_start, m.src_step,
                                                    m.dst_stride, m.dst_start, src_rows, chunks, 32);
                    });
                    launch(grid_elementwise(src_rows * cols), 256, [&] {
                        copy_rows_backward_finish(partial.data(), d_src.data(), m.batch, m.count,
                                                  m.cols, m.src_stride, m.src_start, m.src_step,
                                                  m.dst_stride, m.dst_start, src_rows, 32);
                    });
                    std::vector<double> want = to_d(d_src0);
                    for (u64 b = 0; b < m.batch; ++b)
                        for (u64 i = 0; i < m.count; ++i)
                            for (u64 c = 0; c < cols; ++c)
                                want[m.src_row(b, i) * cols + c] += d_dst[m.dst_row(b, i) * cols + c];
                    expect_close("copy_rows_backward" + tag, d_src, want, 0);
                }
    std::printf("copy_rows: %d maps\n", maps);
}

static void test_gather() {
    const u64 batch = 3, src_rows = 7, count = 4, dst_rows = 6, dst_start = 2;
    // Sources per item (src_rows apart; or 9 apart from row 2 on), and one table every item
    // reads from row 1 on (the position table past its cls row: forward only).
    struct Layout { u64 stride, start; };
    for (Layout lay : {Layout{src_rows, 0}, Layout{src_rows + 2, 2}, Layout{0, 1}})
    for (u64 cols : {1ull, 5ull, 300ull}) {
        std::vector<u32> idx;
        for (u64 b = 0; b < batch; ++b) {
            std::vector<u32> perm(src_rows);
            for (u32 i = 0; i < src_rows; ++i) perm[i] = i;
            std::shuffle(perm.begin(), perm.end(), rng);
            idx.insert(idx.end(), perm.begin(), perm.begin() + count);
        }
        const u64 src_len = ((batch - 1) * lay.stride + lay.start + src_rows) * cols;
        auto src = int_vec(src_len), dst0 = int_vec(batch * dst_rows * cols);
        auto src_row = [&](u64 b, u64 j) { return b * lay.stride + lay.start + idx[b * count + j]; };
        const std::string tag = " cols=" + std::to_string(cols) + " stride=" +
                                std::to_string(lay.stride) + " start=" + std::to_string(lay.start);
        std::vector<float> dst = dst0;
        const u64 n = batch * count * cols;
        for (unsigned g : grids(grid_elementwise(n))) {
            dst = dst0;
            launch(g, 256, [&] {
                gather_rows(src.data(), idx.data(), dst.data(), batch, count, cols, src_rows,
                            lay.stride, lay.start, dst_rows, dst_start);
            });
            std::vector<double> want = to_d(dst0);
            for (u64 b = 0; b < batch; ++b)
                for (u64 j = 0; j < count; ++j)
                    for (u64 c = 0; c < cols; ++c)
                        want[(b * dst_rows + dst_start + j) * cols + c] = src[src_row(b, j) * cols + c];
            expect_close("gather_rows" + tag, dst, want, 0);
            if (lay.stride < lay.start + src_rows) continue;  // the host refuses its backward
            std::vector<float> ds = src;
            launch(g, 256, [&] {
                gather_rows_backward(dst0.data(), idx.data(), ds.data(), batch, count, cols,
                                     src_rows, lay.stride, lay.start, dst_rows, dst_start);
            });
            want = to_d(src);
            for (u64 b = 0; b < batch; ++b)
                for (u64 j = 0; j < count; ++j)
                    for (u64 c = 0; c < cols; ++c)
                        want[src_row(b, j) * cols + c] += dst0[(b * dst_rows + dst_start + j) * cols + c];
            expect_close("gather_rows_backward" + tag, ds, want, 0);
        }
    }
}

static void test_patchify_and_heads() {
    // Patches of 3 one pixel at a time (7 is not a multiple of 3: a row is ignored); patches of
    // 4 and 8 four pixels at a time, with 1 to 5 channels (1 to 4 stored as float4s in (y, x, c)
    // order, 5 one float at a time), rows past the last whole patch, and an output one float off
    // 16 bytes, which must take the one-pixel path.
    struct Patches { u64 n, c, h, w, p, out_offset; };
    for (Patches k : {Patches{2, 3, 7, 9, 3, 0}, Patches{2, 3, 9, 8, 4, 0}, Patches{1, 1, 8, 16, 8, 0},
                      Patches{2, 2, 12, 12, 4, 0}, Patches{2, 3, 9, 8, 4, 1}, Patches{2, 4, 8, 8, 4, 0},
                      Patches{1, 5, 8, 8, 8, 0}}) {
        const u64 n = k.n, c = k.c, h = k.h, w = k.w, p = k.p;
        auto imgs = random_vec(n * c * h * w);
        for (u32 hwc : {0u, 1u}) {
            const u64 L = (h / p) * (w / p), out_len = n * L * p * p * c;
            std::vector<float> out(n * c * h * w + k.out_offset, -7.0f);
            // With a thread per pixel: the grid the one-pixel path needs, which also covers the
            // four-pixel path's groups.
            launch(grid_elementwise(out_len), 256,
                   [&] { patchify(imgs.data(), out.data() + k.out_offset, n, c, h, w, p, hwc); });
            std::vector<double> want(out.size(), -7.0);
            for (u64 b = 0; b < n; ++b)
                for (u64 ci = 0; ci < c; ++ci)
                    for (u64 y = 0; y < (h / p) * p; ++y)
                        for (u64 x = 0; x < (w / p) * p; ++x) {
                            const u64 patch = (y / p) * (w / p) + x / p, py = y % p, px = x % p;
                            const u64 within = hwc ? (py * p + px) * c + ci : ci * p * p + py * p + px;
                            want[k.out_offset + (b * L + patch) * p * p * c + within] =
                                imgs[((b * c + ci) * h + y) * w + x];
                        }
            const std::string tag = "patchify p=" + std::to_string(p) + " c=" + std::to_string(c) +
                                    " offset=" + std::to_string(k.out_offset) + " hwc=" + std::to_string(hwc);
            expect_close(tag, out, want, 0);
            if (p % 4 == 0 && w % 4 == 0 && k.out_offset == 0) {
                // The host's grid for four pixels a thread: a quarter of the threads.
                std::fill(out.begin(), out.end(), -7.0f);
                launch(grid_elementwise(out_len / 4), 256,
                       [&] { patchify(imgs.data(), out.data(), n, c, h, w, p, hwc); });
                expect_close(tag + " quarter grid", out, want, 0);
            }
        }
    }
    // Rows of 38 columns at offset 13 move one float at a time; 48 at offset 16, four at a time.
    struct Case { u64 B, T, H, D, W, off; };
    for (Case k : {Case{2, 5, 3, 4, 38, 13}, Case{2, 5, 2, 8, 48, 16}}) {
        const u64 B = k.B, T = k.T, H = k.H, D = k.D, W = k.W, off = k.off;
        const std::string tag = " W=" + std::to_string(W);
        auto x = random_vec(B * T * W);
        std::vector<float> heads(B * H * T * D, NAN);
        launch(grid_elementwise(heads.size()), 256, [&] { split_heads(x.data(), heads.data(), B, T, H, D, W, off); });
        std::vector<double> want(heads.size());
        for (u64 b = 0; b < B; ++b)
            for (u64 hh = 0; hh < H; ++hh)
                for (u64 t = 0; t < T; ++t)
                    for (u64 j = 0; j < D; ++j)
                        want[((b * H + hh) * T + t) * D + j] = x[(b * T + t) * W + off + hh * D + j];
        expect_close("split_heads" + tag, heads, want, 0);
        std::vector<float> back(x.size(), 3.0f);
        launch(1, 256, [&] { merge_heads(heads.data(), back.data(), B, T, H, D, W, off); });
        std::vector<double> wb(x.size());
        for (u64 i = 0; i < x.size(); ++i) {
            const u64 col = i % W;
            wb[i] = (col >= off && col < off + H * D) ? x[i] : 3.0;
        }
        expect_close("merge_heads" + tag, back, wb, 0);
    }
}

static void test_norms() {
    // Up to 1024 columns LayerNorm runs a warp per row, past it a block per row.
    // The backward sums dgamma's and dbeta's partials in the dx kernel up to LN_FUSED_COLS
    // columns (checked here on each grid, which sets the partials' count), in a kernel of their
    // own past it (2100 columns); both ways are checked where the fused one applies.
    for (auto rc : std::vector<std::pair<u64, u64>>{{1, 1}, {3, 5}, {70, 300}, {5, 600}, {9, 768}, {40, 1000}, {3, 1500}, {4, 2100}}) {
        const u64 rows = rc.first, cols = rc.second;
        std::string tag = " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols);
        auto x = random_vec(rows * cols), g = random_vec(cols), bt = random_vec(cols), dy = random_vec(rows * cols);
        for (auto& v : x) v += 100.0f;  // a large mean: two-pass statistics matter
        // And a grid of 3 blocks, each taking every third row, as the fused backward's one wave
        // of blocks does (`launch::layernorm_backward_blocks`): its next row's loads are issued
        // before a row's sums.
        std::vector<unsigned> ln_grids = grids(grid_rows(rows));
        if (rows > 3) ln_grids.push_back(3);
        for (unsigned gr : ln_grids) {
            std::vector<float> y(rows * cols, NAN), mean(rows, NAN), rstd(rows, NAN);
            std::vector<uint16_t> y16(rows * cols, 0xdead);
            const float eps = 1e-6f;
            launch_rows(gr, 256, [&] {
                layernorm_forward(x.data(), g.data(), bt.data(), y.data(), y16.data(), mean.data(), rstd.data(), rows, cols, eps);
            });
            expect_bf16_copy("layernorm_forward y copy" + tag, y16, y);
            // The copy alone (null y): the same copy, the same statistics.
            std::vector<float> mean2(rows, NAN), rstd2(rows, NAN);
            std::vector<uint16_t> alone(rows * cols, 0xdead);
            launch_rows(gr, 256, [&] {
                layernorm_forward(x.data(), g.data(), bt.data(), nullptr, alone.data(), mean2.data(), rstd2.data(), rows, cols, eps);
            });
            ++checks;
            if (alone != y16 || std::memcmp(mean.data(), mean2.data(), rows * 4) ||
                std::memcmp(rstd.data(), rstd2.data(), rows * 4)) {
                std::printf("FAIL layernorm_forward with a null y differs%s\n", tag.c_str());
                ++failures;
            }
            std::vector<double> wy(rows * cols), wmean(rows), wrstd(rows);
            std::vector<double> xhat(rows * cols);
            for (u64 r = 0; r < rows; ++r) {
                double m = 0, v = 0;
                for (u64 j = 0; j < cols; ++j) m += x[r * cols + j];
                m /= cols;
                for (u64 j = 0; j < cols; ++j) v += (x[r * cols + j] - m) * (x[r * cols + j] - m);
                v /= cols;
                wmean[r] = m;
                wrstd[r] = 1.0 / std::sqrt(v + eps);
                for (u64 j = 0; j < cols; ++j) {
                    xhat[r * cols + j] = (x[r * cols + j] - m) * wrstd[r];
                    wy[r * cols + j] = xhat[r * cols + j] * g[j] + bt[j];
                }
            }
            // x carries ~1e-5 absolute rounding at 100: relative to a spread of ~1 that is 1e-5.
            expect_close("layernorm_forward y" + tag, y, wy, 1e-4);
            expect_close("layernorm_forward mean" + tag, mean, wmean, 1e-6);
            expect_close("layernorm_forward rstd" + tag, rstd, wrstd, 1e-5);

            auto dx0 = random_vec(rows * cols), dg0 = random_vec(cols), db0 = random_vec(cols);
            std::vector<float> dx = dx0, dg = dg0, db = db0;
            std::vector<uint16_t> dx16(rows * cols, 0xdead);
            launch_rows(gr, 256, [&] {
                layernorm_backward_dx(dy.data(), nullptr, x.data(), g.data(), mean.data(), rstd.data(), dx.data(),
                                      dx16.data(), nullptr, nullptr, rows, cols);
            });
            expect_bf16_copy("layernorm_backward dx copy" + tag, dx16, dx);
            const u64 chunks = chunks_of(rows);
            std::vector<double> pg(chunks * cols, NAN), pb(chunks * cols, NAN);
            launch(grid_elementwise(chunks * cols), 256, [&] {
                layernorm_param_partials(dy.data(), nullptr, x.data(), mean.data(), rstd.data(), pg.data(), pb.data(), rows, cols, chunks, 32);
            });
            launch_rows(grid_rows(2 * cols), 256, [&] {
                column_sum_finish_pair(pg.data(), dg.data(), pb.data(), db.data(), chunks, cols);
            });
            // Fused: partials per block of this grid (`gr` of them), the same dx bitwise.
            std::vector<float> fdx = dx0, fdg = dg0, fdb = db0;
            const bool fused = cols <= LN_FUSED_COLS;
            if (fused) {
                std::vector<uint16_t> fdx16(rows * cols, 0xdead);
                std::vector<double> fpg(gr * cols, NAN), fpb(gr * cols, NAN);
                launch_rows(gr, 256, [&] {
                    layernorm_backward_dx(dy.data(), nullptr, x.data(), g.data(), mean.data(), rstd.data(), fdx.data(),
                                          fdx16.data(), fpg.data(), fpb.data(), rows, cols);
                });
                // One block: its warps walk both columns' ranges.
                launch_rows(1, 256, [&] {
                    column_sum_finish_pair(fpg.data(), fdg.data(), fpb.data(), fdb.data(), gr, cols);
                });
                expect_close("layernorm_backward fused dx" + tag, fdx, to_d(dx), 0);
                expect_bf16_copy("layernorm_backward fused dx copy" + tag, fdx16, fdx);
            }
            {
                // dy as a bf16 copy alone (null floats): bitwise what the floats of the same
                // values give, both ways of summing the parameter gradients.
                std::vector<uint16_t> dy16(rows * cols);
                std::vector<float> dyb(rows * cols);
                for (u64 i = 0; i < rows * cols; ++i) {
                    dy16[i] = nearest_bf16(dy[i]);
                    uint32_t w = (uint32_t)dy16[i] << 16;
                    std::memcpy(&dyb[i], &w, 4);
                }
                for (bool fuse : {false, true}) {
                    if (fuse && !fused) continue;
                    const u64 parts = fuse ? gr : chunks;
                    std::vector<float> want_dx = dx0, got_dx = dx0;
                    std::vector<double> want_g(parts * cols, NAN), want_b(parts * cols, NAN);
                    std::vector<double> got_g(parts * cols, NAN), got_b(parts * cols, NAN);
                    for (int k = 0; k < 2; ++k) {
                        const float* f = k ? nullptr : dyb.data();
                        const uint16_t* h = k ? dy16.data() : nullptr;
                        auto& out = k ? got_dx : want_dx;
                        auto& pgk = k ? got_g : want_g;
                        auto& pbk = k ? got_b : want_b;
                        launch_rows(gr, 256, [&] {
                            layernorm_backward_dx(f, h, x.data(), g.data(), mean.data(), rstd.data(), out.data(), nullptr,
                                                  fuse ? pgk.data() : nullptr, fuse ? pbk.data() : nullptr, rows, cols);
                        });
                        if (!fuse)
                            launch(grid_elementwise(chunks * cols), 256, [&] {
                                layernorm_param_partials(f, h, x.data(), mean.data(), rstd.data(), pgk.data(), pbk.data(),
                                                         rows, cols, chunks, 32);
                            });
                    }
                    ++checks;
                    if (std::memcmp(want_dx.data(), got_dx.data(), rows * cols * 4) ||
                        std::memcmp(want_g.data(), got_g.data(), parts * cols * 8) ||
                        std::memcmp(want_b.data(), got_b.data(), parts * cols * 8)) {
                        std::printf("FAIL layernorm_backward on a bf16 dy (%s)%s\n", fuse ? "fused" : "separate",
                                    tag.c_str());
                        ++failures;
                    }
                }
            }
            std::vector<double> wdx = to_d(dx0), wdg = to_d(dg0), wdb = to_d(db0);
            for (u64 r = 0; r < rows; ++r) {
                double a = 0, b = 0;
                for (u64 j = 0; j < cols; ++j) {
                    a += dy[r * cols + j] * g[j];
                    b += dy[r * cols + j] * g[j] * xhat[r * cols + j];
                }
                a /= cols, b /= cols;
                for (u64 j = 0; j < cols; ++j) {
                    const double d = dy[r * cols + j];
                    wdx[r * cols + j] += wrstd[r] * (d * g[j] - a - xhat[r * cols + j] * b);
                    wdg[j] += d * xhat[r * cols + j];
                    wdb[j] += d;
                }
            }
            expect_close("layernorm_backward dx" + tag, dx, wdx, 1e-3);
            expect_close("layernorm_backward dgamma" + tag, dg, wdg, 1e-4 * std::sqrt((double)rows));
            expect_close("layernorm_backward dbeta" + tag, db, wdb, 1e-5);
            if (fused) {
                expect_close("layernorm_backward fused dgamma" + tag, fdg, wdg, 1e-4 * std::sqrt((double)rows));
                expect_close("layernorm_backward fused dbeta" + tag, fdb, wdb, 1e-5);
            }

            std::vector<float> ny(rows * cols, NAN);
            if (cols >= 2) {
                launch_rows(gr, 256, [&] { normalize_rows(x.data(), ny.data(), rows, cols, eps); });
                std::vector<double> wn(rows * cols);
                for (u64 r = 0; r < rows; ++r) {
                    double m = wmean[r], v = 0;
                    for (u64 j = 0; j < cols; ++j) v += (x[r * cols + j] - m) * (x[r * cols + j] - m);
                    const double sd = std::sqrt(v / (cols - 1) + eps);
                    for (u64 j = 0; j < cols; ++j) wn[r * cols + j] = (x[r * cols + j] - m) / sd;
                }
                expect_close("normalize_rows" + tag, ny, wn, 1e-4);
            }

            const float scale = 0.37f;
            auto sx = random_vec(rows * cols, -20, 20);
            std::vector<float> sy(rows * cols, NAN);
            launch_rows(gr, 256, [&] { softmax_forward(sx.data(), sy.data(), rows, cols, scale); });
            std::vector<double> wsy(rows * cols);
            for (u64 r = 0; r < rows; ++r) {
                double mx = -INFINITY, s = 0;
                for (u64 j = 0; j < cols; ++j) mx = std::fmax(mx, (double)scale * sx[r * cols + j]);
                for (u64 j = 0; j < cols; ++j) s += std::exp((double)scale * sx[r * cols + j] - mx);
                for (u64 j = 0; j < cols; ++j) wsy[r * cols + j] = std::exp((double)scale * sx[r * cols + j] - mx) / s;
            }
            expect_close("softmax_forward" + tag, sy, wsy, 2e-6);
            auto sdx0 = random_vec(rows * cols);
            std::vector<float> sdx = sdx0;
            launch_rows(gr, 256, [&] { softmax_backward(sy.data(), dy.data(), sdx.data(), rows, cols, scale); });
            std::vector<double> wsdx = to_d(sdx0);
            for (u64 r = 0; r < rows; ++r) {
                double dot = 0;
                for (u64 j = 0; j < cols; ++j) dot += (double)dy[r * cols + j] * sy[r * cols + j];
                for (u64 j = 0; j < cols; ++j)
                    wsdx[r * cols + j] += scale * sy[r * cols + j] * (dy[r * cols + j] - dot);
            }
            expect_close("softmax_backward" + tag, sdx, wsdx, 1e-5);
        }
    }
}

// Bias gradients: dense column sums over a window of rows in chunks, then the chunks folded in.
static void test_column_sums() {
    struct Case { u64 first, rows, cols, chunk_len; };
    // 286 chunks: more than a warp's lanes, the last ones partial.
    for (Case c : {Case{0, 1, 1, 32}, Case{0, 70, 5, 32}, Case{3, 100, 300, 7}, Case{1, 33, 768, 32},
                   Case{2, 2000, 5, 7}}) {
        std::string tag = " first=" + std::to_string(c.first) + " rows=" + std::to_string(c.rows) +
                          " cols=" + std::to_string(c.cols) + " chunk=" + std::to_string(c.chunk_len);
        // Rows on both sides of the window must not be summed.
        auto x = random_vec((c.first + c.rows + 2) * c.cols);
        const u64 chunks = (c.rows + c.chunk_len - 1) / c.chunk_len;
        for (unsigned g : grids(grid_elementwise(chunks * c.cols))) {
            std::vector<double> partial(chunks * c.cols, NAN);
            launch(g, 256, [&] {
                column_sum_partials(x.data(), partial.data(), c.first, c.rows, c.cols, chunks, c.chunk_len);
            });
            const auto out0 = random_vec(c.cols);
            std::vector<double> want = to_d(out0);
            for (u64 r = c.first; r < c.first + c.rows; ++r) {
                for (u64 j = 0; j < c.cols; ++j) want[j] += x[r * c.cols + j];
            }
            // A warp per column; one block takes every column in turn.
            for (unsigned fg : {1u, grid_rows(c.cols)}) {
                std::vector<float> out = out0;
                launch_rows(fg, 256, [&] { column_sum_finish(partial.data(), out.data(), chunks, c.cols); });
                expect_close("column_sum_partials" + tag + " grid=" + std::to_string(g) + "/" + std::to_string(fg),
                             out, want, 1e-6);
            }
            // Over a bf16 copy (a gradient whose producer wrote the copy alone): the partials are
            // bitwise those of its values as floats.
            std::vector<uint16_t> x16(x.size());
            std::vector<float> widened(x.size());
            for (u64 i = 0; i < x.size(); ++i) {
                x16[i] = (uint16_t)bf16_bits(x[i]);
                widened[i] = __uint_as_float((unsigned)x16[i] << 16);
            }
            std::vector<double> from16(chunks * c.cols, NAN), fromf(chunks * c.cols, NAN);
            launch(g, 256, [&] {
                column_sum_partials_bf16(x16.data(), from16.data(), c.first, c.rows, c.cols, chunks, c.chunk_len);
            });
            launch(g, 256, [&] {
                column_sum_partials(widened.data(), fromf.data(), c.first, c.rows, c.cols, chunks, c.chunk_len);
            });
            ++checks;
            if (std::memcmp(from16.data(), fromf.data(), from16.size() * sizeof(double)) != 0) {
                std::printf("FAIL column_sum_partials_bf16%s grid=%u\n", tag.c_str(), g);
                ++failures;
            }
        }
    }
}

static void test_loss() {
    for (auto rc : std::vector<std::pair<u64, u64>>{{1, 3}, {7, 48}, {600, 300}}) {
        const u64 rows = rc.first, cols = rc.second;
        std::string tag = " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols);
        auto pred = random_vec(rows * cols), target = random_vec(rows * cols);
        std::vector<float> mask(rows);
        for (u64 r = 0; r < rows; ++r) mask[r] = (r % 4 != 1) ? 1.0f : 0.0f;
        std::vector<double> row_loss(rows, NAN);
        std::vector<float> loss(1, NAN);
        launch_rows(grid_rows(rows), 256, [&] { masked_mse_rows(pred.data(), target.data(), mask.data(), row_loss.data(), rows, cols); });
        launch_rows(1, 256, [&] { masked_mse_total(row_loss.data(), mask.data(), loss.data(), rows); });
        double num = 0, den = 0;
        for (u64 r = 0; r < rows; ++r) {
            double s = 0;
            for (u64 j = 0; j < cols; ++j) {
                const double d = (double)pred[r * cols + j] - target[r * cols + j];
                s += d * d;
            }
            num += mask[r] * s / cols;
            den += mask[r];
        }
        expect_close("masked_mse_forward" + tag, loss, {num / den}, 1e-7);
        std::vector<double> msum(1, NAN);
        auto dp0 = random_vec(rows * cols);
        std::vector<float> dp = dp0;
        const float d_loss = 0.25f;
        launch_rows(1, 256, [&] { mask_sum(mask.data(), msum.data(), rows); });
        launch(grid_elementwise(rows * cols), 256, [&] {
            masked_mse_backward(pred.data(), target.data(), mask.data(), msum.data(), dp.data(), rows, cols, d_loss);
        });
        std::vector<double> want = to_d(dp0);
        for (u64 e = 0; e < rows * cols; ++e)
            want[e] += d_loss * mask[e / cols] * 2.0 * ((double)pred[e] - target[e]) / (cols * den);
        expect_close("masked_mse_backward" + tag, dp, want, 1e-6);
    }
    // An all-zero mask gives NaN, as PyTorch does.
    std::vector<float> p(6, 1.0f), t(6, 0.0f), m(3, 0.0f), loss(1, 0.0f);
    std::vector<double> rl(3);
    launch_rows(3, 256, [&] { masked_mse_rows(p.data(), t.data(), m.data(), rl.data(), 3, 2); });
    launch_rows(1, 256, [&] { masked_mse_total(rl.data(), m.data(), loss.data(), 3); });
    expect_close("masked_mse_forward all-zero mask", loss, {NAN}, 0);
}

// Naive attention in double, from the trait's contract: per (image, head) the scores
// s = scale * q k^T, P = softmax(s), out = P v, lse = log sum exp s; the backward through
// dP = dO v^T, dS = P * (dP - rowsum(P * dP)).
struct AttentionRef {
    std::vector<double> out, lse, d_qkv;
};
static AttentionRef attention_reference(const std::vector<float>& qkv, const std::vector<float>& d_out,
                                        u64 B, u64 T, u64 H, u64 hd, double scale) {
    const u64 D = H * hd, W = 3 * D;
    AttentionRef r{std::vector<double>(B * T * D), std::vector<double>(B * H * T),
                   std::vector<double>(B * T * W)};
    auto at = [&](u64 b, u64 t, u64 s, u64 h, u64 c) { return (double)qkv[(b * T + t) * W + s * D + h * hd + c]; };
    for (u64 b = 0; b < B; ++b)
        for (u64 h = 0; h < H; ++h) {
            std::vector<double> P(T * T), dS(T * T);
            for (u64 i = 0; i < T; ++i) {
                double mx = -INFINITY, sum = 0.0;
                for (u64 j = 0; j < T; ++j) {
                    double s = 0.0;
                    for (u64 c = 0; c < hd; ++c) s += at(b, i, 0, h, c) * at(b, j, 1, h, c);
                    P[i * T + j] = scale * s;
                    mx = std::fmax(mx, scale * s);
                }
                for (u64 j = 0; j < T; ++j) sum += std::exp(P[i * T + j] - mx);
                for (u64 j = 0; j < T; ++j) P[i * T + j] = std::exp(P[i * T + j] - mx) / sum;
                r.lse[(b * H + h) * T + i] = mx + std::log(sum);
                for (u64 c = 0; c < hd; ++c) {
                    double o = 0.0;
                    for (u64 j = 0; j < T; ++j) o += P[i * T + j] * at(b, j, 2, h, c);
                    r.out[(b * T + i) * D + h * hd + c] = o;
                }
                auto dO = [&](u64 c) { return (double)d_out[(b * T + i) * D + h * hd + c]; };
                std::vector<double> dP(T);
                double drow = 0.0;
                for (u64 j = 0; j < T; ++j) {
                    for (u64 c = 0; c < hd; ++c) dP[j] += dO(c) * at(b, j, 2, h, c);
                    drow += P[i * T + j] * dP[j];
                }
                for (u64 j = 0; j < T; ++j) dS[i * T + j] = P[i * T + j] * (dP[j] - drow);
            }
            for (u64 t = 0; t < T; ++t)
                for (u64 c = 0; c < hd; ++c) {
                    double dq = 0.0, dk = 0.0, dv = 0.0;
                    for (u64 u = 0; u < T; ++u) {
                        dq += dS[t * T + u] * at(b, u, 1, h, c);
                        dk += dS[u * T + t] * at(b, u, 0, h, c);
                        dv += P[u * T + t] * (double)d_out[(b * T + u) * D + h * hd + c];
                    }
                    const u64 row = (b * T + t) * W + h * hd + c;
                    r.d_qkv[row] = scale * dq;
                    r.d_qkv[row + D] = scale * dk;
                    r.d_qkv[row + 2 * D] = dv;
                }
        }
    return r;
}

static float bf16_value(float x) {
    const uint32_t bits = bf16_bits(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// The f32 kernels, one per head width, picked as ops.rs picks them.
static void attention_forward(const float* qkv, float* out, float* lse, u64 B, u64 T, u64 H, u64 hd, float scale) {
    (hd <= 32 ? attention_forward_hd32 : attention_forward_hd64)(qkv, out, lse, B, T, H, hd, scale);
}
static void attention_backward_dq(const float* qkv, const float* out, const float* lse, const float* d_out,
                                  float* d_qkv, float* drow, u64 B, u64 T, u64 H, u64 hd, float scale) {
    (hd <= 32 ? attention_backward_dq_hd32 : attention_backward_dq_hd64)(qkv, out, lse, d_out, d_qkv, drow, B, T, H,
                                                                          hd, scale);
}
static void attention_backward_dkv(const float* qkv, const float* lse, const float* d_out, const float* drow,
                                   float* d_qkv, u64 B, u64 T, u64 H, u64 hd, float scale) {
    (hd <= 32 ? attention_backward_dkv_hd32 : attention_backward_dkv_hd64)(qkv, lse, d_out, drow, d_qkv, B, T, H, hd,
                                                                            scale);
}

// The tensor-core kernels on bf16 inputs, one per head width, picked as ops.rs picks them, or
// (`tail`) the tail kernel of the same direction, which takes the same arguments.
static void attention_forward_mma_bf16(bool tail, const uint16_t* qkv16, float* out, uint16_t* out16, float* lse,
                                       u64 B, u64 T, u64 H, u64 hd, float scale, unsigned flags) {
    auto kernel = hd <= 32 ? attention_forward_mma_bf16_hd32 : attention_forward_mma_bf16_hd64;
    (tail ? attention_forward_mma_tail : kernel)(nullptr, qkv16, out, out16, lse, B, T, H, hd, scale, flags);
}
static void attention_backward_dq_mma_bf16(bool tail, const uint16_t* qkv16, const uint16_t* out16, const float* lse,
                                           const uint16_t* d_out16, float* d_qkv, uint16_t* d_qkv16, float2* stats,
                                           u64 B, u64 T, u64 H, u64 hd, float scale, unsigned flags) {
    auto kernel = hd <= 32 ? attention_backward_dq_mma_bf16_hd32 : attention_backward_dq_mma_bf16_hd64;
    (tail ? attention_backward_dq_mma_tail : kernel)(nullptr, qkv16, nullptr, out16, lse, nullptr, d_out16, d_qkv, d_qkv16,
                                                     stats, B, T, H, hd, scale, flags);
}
static void attention_backward_dkv_mma_bf16(bool tail, const uint16_t* qkv16, const uint16_t* d_out16,
                                            const float2* stats, float* d_qkv, uint16_t* d_qkv16, u64 B, u64 T,
                                            u64 H, u64 hd, float scale, unsigned flags) {
    auto kernel = hd <= 32 ? attention_backward_dkv_mma_bf16_hd32 : attention_backward_dkv_mma_bf16_hd64;
    (tail ? attention_backward_dkv_mma_tail : kernel)(nullptr, qkv16, nullptr, d_out16, stats, d_qkv, d_qkv16, B,
                                                      T, H, hd, scale, flags);
}

// One direction of the tensor-core attention as ops.rs launches it: `run(false)` (the main
// kernel) on `grid`, then, where MMA_SPLIT leaves the tail blocks to the tail kernel, `run(true)`
// on `tail_grid`.
static void launch_mma(unsigned grid, unsigned tail_grid, unsigned flags, u64 T,
                       const std::function<void(bool)>& run) {
    launch_rows(grid, MMA_THREADS, [&] { run(false); });
    if ((flags & MMA_SPLIT) && mma_has_tail(T)) launch_rows(tail_grid, MMA_THREADS, [&] { run(true); });
}

// The tensor-core kernels (attention_mma.cu) against the naive reference of their inputs
// rounded to bf16: what is left is f32 accumulation and the rounding of the probabilities and
// score gradients to bf16 before their products, up to 2^-8 of each term. The output is a
// weighted mean (within 4e-3 of the reference); a gradient sums up to T terms of either sign,
// whose roundings add up past the result's own size where they cancel (within 1e-2). One block
// of MMA_THREADS per MMA_ROWS rows, or a striding grid of 2 blocks. The bf16 copies of out and
// d_qkv that the kernels write beside them are each element's nearest bf16.
static void test_attention_mma(u64 B, u64 T, u64 H, u64 hd, bool small_grid, unsigned flags,
                               std::vector<float> qkv, std::vector<float> d_out, float scale,
                               const std::string& tag) {
    for (float& x : qkv) x = bf16_value(x);
    for (float& x : d_out) x = bf16_value(x);
    const AttentionRef ref = attention_reference(qkv, d_out, B, T, H, hd, scale);
    const u64 D = H * hd, rows = B * T;
    const unsigned grid = small_grid ? 2 : (unsigned)(B * H * ((T + MMA_ROWS - 1) / MMA_ROWS));
    const unsigned tail_grid = small_grid ? 2 : (unsigned)(B * H);
    std::vector<float> out(rows * D, NAN), lse(B * H * T, NAN);
    std::vector<uint16_t> out16(rows * D, 0xdead);
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_forward_mma_tail : attention_forward_mma)(qkv.data(), nullptr, out.data(), out16.data(), lse.data(), B, T, H, hd, scale, flags);
    });
    expect_close("attention_forward_mma out" + tag, out, ref.out, 4e-3);
    expect_bf16_copy("attention_forward_mma out copy" + tag, out16, out);
    expect_close("attention_forward_mma lse" + tag, lse, ref.lse, 1e-5);
    // O as the backward reads it in the bf16 mode: the forward's bf16 copy (Drow sums the
    // products of bf16 values), so the reference's O rounded, for the f32 kernels too.
    std::vector<float> ref_out(ref.out.begin(), ref.out.end()), ref_lse(ref.lse.begin(), ref.lse.end());
    for (float& x : ref_out) x = bf16_value(x);
    // The dQ kernel's row statistics for the dK, dV kernel: (lse in base 2, Drow) per row.
    std::vector<float> d_qkv(rows * 3 * D, NAN), stats(2 * B * H * T, NAN);
    float2* st = reinterpret_cast<float2*>(stats.data());
    std::vector<uint16_t> d_qkv16(rows * 3 * D, 0xdead);
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dq_mma_tail : attention_backward_dq_mma)(qkv.data(), nullptr, ref_out.data(), nullptr, ref_lse.data(), d_out.data(), nullptr,
                                  d_qkv.data(), d_qkv16.data(), st, B, T, H, hd, scale, flags);
    });
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dkv_mma_tail : attention_backward_dkv_mma)(qkv.data(), nullptr, d_out.data(), nullptr, st, d_qkv.data(), d_qkv16.data(), B,
                                   T, H, hd, scale, flags);
    });
    expect_close("attention_backward_mma d_qkv" + tag, d_qkv, ref.d_qkv, 1e-2);
    expect_bf16_copy("attention_backward_mma d_qkv copy" + tag, d_qkv16, d_qkv);
    // Without copies (null): the same gradients.
    std::vector<float> plain(rows * 3 * D, NAN);
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dq_mma_tail : attention_backward_dq_mma)(qkv.data(), nullptr, ref_out.data(), nullptr, ref_lse.data(), d_out.data(), nullptr,
                                  plain.data(), nullptr, st, B, T, H, hd, scale, flags);
    });
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dkv_mma_tail : attention_backward_dkv_mma)(qkv.data(), nullptr, d_out.data(), nullptr, st, plain.data(), nullptr, B, T, H,
                                   hd, scale, flags);
    });
    expect_close("attention_backward_mma d_qkv without copies" + tag, plain, to_d(d_qkv), 0);
    // The copy alone (null floats: d_qkv from `alloc_operand`): the same copy.
    std::vector<uint16_t> alone16(rows * 3 * D, 0xdead);
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dq_mma_tail : attention_backward_dq_mma)(qkv.data(), nullptr, ref_out.data(), nullptr, ref_lse.data(), d_out.data(), nullptr,
                                  nullptr, alone16.data(), st, B, T, H, hd, scale, flags);
    });
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        (tail ? attention_backward_dkv_mma_tail : attention_backward_dkv_mma)(qkv.data(), nullptr, d_out.data(), nullptr, st, nullptr, alone16.data(), B, T,
                                   H, hd, scale, flags);
    });
    expect_bf16_copy("attention_backward_mma d_qkv copy alone" + tag, alone16, d_qkv);
    // qkv, O and dO read from their bf16 copies alone by the bf16 kernels (qkv16, out16 and
    // d_out16, the floats null): the inputs hold bf16 values already, so every output is bitwise
    // the same.
    std::vector<uint16_t> qkv16(qkv.size()), d_out16(d_out.size()), ref_out16(ref_out.size());
    for (u64 i = 0; i < qkv.size(); ++i) qkv16[i] = (uint16_t)bf16_bits(qkv[i]);
    for (u64 i = 0; i < d_out.size(); ++i) d_out16[i] = (uint16_t)bf16_bits(d_out[i]);
    for (u64 i = 0; i < ref_out.size(); ++i) ref_out16[i] = (uint16_t)bf16_bits(ref_out[i]);
    std::vector<float> out_b(rows * D, NAN), lse_b(B * H * T, NAN), d_qkv_b(rows * 3 * D, NAN),
        stats_b(2 * B * H * T, NAN);
    float2* st_b = reinterpret_cast<float2*>(stats_b.data());
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        attention_forward_mma_bf16(tail, qkv16.data(), out_b.data(), nullptr, lse_b.data(), B, T, H, hd, scale, flags);
    });
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        attention_backward_dq_mma_bf16(tail, qkv16.data(), ref_out16.data(), ref_lse.data(), d_out16.data(), d_qkv_b.data(),
                                       nullptr, st_b, B, T, H, hd, scale, flags);
    });
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        attention_backward_dkv_mma_bf16(tail, qkv16.data(), d_out16.data(), st_b, d_qkv_b.data(), nullptr, B, T, H, hd,
                                        scale, flags);
    });
    expect_close("attention_forward_mma out from bf16 qkv" + tag, out_b, to_d(out), 0);
    expect_close("attention_forward_mma lse from bf16 qkv" + tag, lse_b, to_d(lse), 0);
    expect_close("attention_backward_mma d_qkv from bf16 qkv and dO" + tag, d_qkv_b, to_d(d_qkv), 0);
    expect_close("attention_backward_mma row statistics from bf16 dO" + tag, stats_b, to_d(stats), 0);
    // The output's copy alone (null floats: out from `alloc_operand`): the same copy.
    std::vector<uint16_t> out_alone16(rows * D, 0xdead);
    launch_mma(grid, tail_grid, flags, T, [&](bool tail) {
        attention_forward_mma_bf16(tail, qkv16.data(), nullptr, out_alone16.data(), lse_b.data(), B, T, H, hd, scale,
                                   flags);
    });
    expect_bf16_copy("attention_forward_mma out copy alone" + tag, out_alone16, out);
}

// test_attention_mma with the warps in lockstep and again with each warp running ahead
// (`warp_ahead`): the staging buffers' barriers must hold in either order.
static void test_attention_mma_orders(u64 B, u64 T, u64 H, u64 hd, bool small_grid,
                                      const std::vector<float>& qkv, const std::vector<float>& d_out,
                                      float scale, const std::string& tag) {
    // Each tile staged while the one before is computed (the default) and the tail blocks
    // split (`MAE_CUDA_ATTENTION_TAIL=split`), in both orders; staged just before it is
    // computed (`MAE_CUDA_ATTENTION_PREFETCH=off`); the tail blocks whole in the main kernels
    // (the default).
    const struct {
        bool ahead;
        unsigned flags;
    } runs[] = {{false, MMA_PREFETCH | MMA_SPLIT},
                {true, MMA_PREFETCH | MMA_SPLIT},
                {true, MMA_SPLIT},
                {true, MMA_PREFETCH}};
    for (const auto& r : runs) {
        warp_ahead = r.ahead;
        const std::string how = std::string(r.ahead ? " warp-ahead" : "") +
                                (r.flags & MMA_PREFETCH ? "" : " no prefetch") +
                                (r.flags & MMA_SPLIT ? "" : " tail whole");
        test_attention_mma(B, T, H, hd, small_grid, r.flags, qkv, d_out, scale, tag + how);
    }
    warp_ahead = false;
}

// The fused attention kernels against the naive reference, on the grids ops.rs launches (one
// block of ATT_THREADS per row tile of each (image, head)) and on a smaller grid that makes the
// blocks stride. Token counts straddle the 32-row staging tile and the 64-row thread tile; head
// widths fill the 32 and 64 instantiations exactly and partly (6, 8, 16, 48; 6 is not a multiple
// of the tensor-core kernels' four-float loads). The tensor-core kernels' last tiles hold 1 to
// 64 valid rows, so each of their tile widths (16, 32, 64 rows: MMA_BY_STEPS) runs partly
// filled: 5, 6, 7, 9 rows (one step), 17, 30 (two), 33, 50 (four); and their blocks of 64 rows
// end with one to four warps whose rows all lie past the tokens. The backward runs on the reference out and
// lse, so each kernel is checked on its own.
static void test_attention() {
    struct Case {
        u64 B, T, H, hd;
        bool small_grid;
    };
    const Case cases[] = {{2, 7, 3, 8, false},  {1, 70, 2, 64, false}, {2, 33, 2, 48, false},
                          {3, 1, 2, 32, false}, {2, 50, 3, 16, true},  {2, 9, 2, 6, false},
                          {1, 81, 2, 16, false}, {2, 30, 2, 32, false}};
    for (const Case& k : cases) {
        const u64 D = k.H * k.hd, W = 3 * D, rows = k.B * k.T;
        const float scale = 1.0f / std::sqrt((float)k.hd);
        const std::string tag = " B" + std::to_string(k.B) + " T" + std::to_string(k.T) + " H" +
                                std::to_string(k.H) + " hd" + std::to_string(k.hd);
        auto qkv = random_vec(rows * W);
        auto d_out = random_vec(rows * D);
        const AttentionRef ref = attention_reference(qkv, d_out, k.B, k.T, k.H, k.hd, scale);
        // In lockstep and with each warp running ahead (`warp_ahead`), as the tensor-core
        // kernels below.
        for (bool ahead : {false, true}) {
            warp_ahead = ahead;
            const std::string how = tag + (ahead ? " warp-ahead" : "");
            const u64 tiles = (k.T + ATT_THREADS - 1) / ATT_THREADS;
            const unsigned grid = k.small_grid ? 2 : (unsigned)(k.B * k.H * tiles);
            std::vector<float> out(rows * D, NAN), lse(k.B * k.H * k.T, NAN);
            launch_rows(grid, ATT_THREADS, [&] {
                attention_forward(qkv.data(), out.data(), lse.data(), k.B, k.T, k.H, k.hd, scale);
            });
            expect_close("attention_forward out" + how, out, ref.out, 1e-5);
            expect_close("attention_forward lse" + how, lse, ref.lse, 1e-5);
            std::vector<float> ref_out(ref.out.begin(), ref.out.end()), ref_lse(ref.lse.begin(), ref.lse.end());
            std::vector<float> d_qkv(rows * W, NAN), drow(k.B * k.H * k.T, NAN);
            launch_rows(grid, ATT_THREADS, [&] {
                attention_backward_dq(qkv.data(), ref_out.data(), ref_lse.data(), d_out.data(), d_qkv.data(),
                                      drow.data(), k.B, k.T, k.H, k.hd, scale);
            });
            launch_rows(grid, ATT_THREADS, [&] {
                attention_backward_dkv(qkv.data(), ref_lse.data(), d_out.data(), drow.data(), d_qkv.data(), k.B,
                                       k.T, k.H, k.hd, scale);
            });
            expect_close("attention_backward d_qkv" + how, d_qkv, ref.d_qkv, 1e-4);
        }
        warp_ahead = false;
        test_attention_mma_orders(k.B, k.T, k.H, k.hd, k.small_grid, qkv, d_out, scale, tag);
    }
    // Several key tiles of the tensor-core kernels, the last one partial; with striding blocks,
    // whose first tile overwrites a staging buffer of the block before.
    const u64 B = 1, T = 197, H = 2, hd = 32;
    for (bool small_grid : {false, true}) {
        test_attention_mma_orders(B, T, H, hd, small_grid, random_vec(B * T * 3 * H * hd),
                                  random_vec(B * T * H * hd), 1.0f / std::sqrt((float)hd),
                                  std::string(" B1 T197 H2 hd32") + (small_grid ? " grid 2" : ""));
    }
}

// The nearest bf16 to a finite x, ties to the even mantissa, found by comparing the two bf16
// neighbours in double: an oracle independent of the kernel's integer rounding.
static void test_round_to_bf16() {
    std::vector<float> x = {0.0f, -0.0f, 1.0f, 1.00390625f, 1.01171875f, 1.0f + 1.0f / 512,
                            3.0e38f, 3.4028235e38f, INFINITY, -INFINITY, 1e-40f, -1e-45f};
    std::uniform_int_distribution<uint32_t> bits;
    while (x.size() < 1001) {
        uint32_t u = bits(rng);
        if ((u & 0x7f800000u) == 0x7f800000u) continue;  // the specials are listed above
        float f;
        std::memcpy(&f, &u, 4);
        x.push_back(f);
    }
    x.push_back(NAN);
    for (u64 n : {1ull, 2ull, 1002ull, 1001ull}) {
        for (unsigned g : grids(grid_elementwise((n + 1) / 2))) {
            std::vector<uint32_t> pairs((n + 1) / 2, 0xdeadbeefu);
            launch(g, 256, [&] { round_to_bf16(x.data(), pairs.data(), n); });
            ++checks;
            for (u64 i = 0; i < 2 * pairs.size(); ++i) {
                const uint16_t got = (uint16_t)(pairs[i / 2] >> (16 * (i % 2)));
                bool ok;
                if (i >= n) {
                    ok = got == 0;
                } else if (std::isnan(x[i])) {
                    ok = (got & 0x7f80u) == 0x7f80u && (got & 0x7fu) != 0;
                } else if (std::isinf(x[i])) {
                    uint32_t u;
                    std::memcpy(&u, &x[i], 4);
                    ok = got == (uint16_t)(u >> 16);
                } else {
                    ok = got == nearest_bf16(x[i]);
                }
                if (!ok) {
                    std::printf("FAIL round_to_bf16 n=%llu grid=%u: element %llu (%.9g) got %04x\n",
                                n, g, i, i < n ? x[i] : 0.0f, got);
                    ++failures;
                    break;
                }
            }
        }
    }
}

int main() {
    // Every kernel in two orders of its warps: in lockstep (each warp collective opens for all
    // warps in one round), and each warp running ahead of the others as far as the barriers let
    // it (`warp_ahead`): a shared buffer that a barrier does not guard fails in one of them.
    // The attention tests choose their orders themselves.
    for (bool ahead : {false, true}) {
        warp_ahead = ahead;
        test_elementwise();
        test_adamw_many();
        test_round_to_bf16();
        test_scale_rows();
        test_bias_gelu();
        test_copy_rows();
        test_gather();
        test_patchify_and_heads();
        test_norms();
        test_column_sums();
        test_loss();
    }
    warp_ahead = false;
    test_attention();
    std::printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
