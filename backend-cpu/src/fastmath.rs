//! Branch-free `exp`, GELU and the GELU gradient in `f32`, eight lanes at a time with AVX2 + FMA.
//!
//! Each function is written once, generic over [`Lanes`] (one `f32`, eight in an AVX2 register,
//! or a pair of those), from `+ - * /`, fused multiply-adds, selections and exponent-field
//! arithmetic only. Every one of those is exactly rounded (`f32::mul_add` is a correctly rounded
//! FMA like `vfmadd`), so the scalar code, used for CPUs without AVX2/FMA, gives bitwise the
//! results of the vector code; a test checks it. Nothing calls the platform's C library, so
//! results are the same on every operating system.
//!
//! GELU and its gradient take, for `|x| <= 1`, an `erf` polynomial in `x^2`, and beyond,
//! `Phi(-|x|) = exp(-x^2 / 2) erfcx(|x| / sqrt 2) / 2`: `exp(-x^2 / 2) = (1 + s) 2^n` from `x^2`
//! carried in two floats (Cody-Waite reduction, a degree-6 polynomial, `1 + s` never rounded on
//! its own, `2^n` shifted into place from the rounding add), and `erfcx / 2 = t h(t)` with
//! `t = 1 / (1 + |x|)`, `h` of degree 10. Every lane computes both forms and selects (see
//! [`normal`]). What limits the speed is as much the dependency chain (the division, then `h`,
//! then the products) as the FMA count, so `h` is mostly in Estrin's form, the factors of the
//! tail are scaled before `h` is ready, and the vector loops run two vectors interleaved
//! (`tests::gelu_speed` measures ns per element).
//!
//! Accuracy, measured against `libm` in `f64` on every third `f32` of `[-16, 16]` (GELU) and
//! `[-110, 89]` (`exp`) by `tests::print_error_bounds`, and asserted on a sparser sweep by
//! `tests::accuracy_against_libm`, in ulps (units in the last place of the correctly rounded
//! `f32`, subnormals included):
//! - [`exp`]: at most 1 ulp; 0 below -103.98 like the correctly rounded value, +inf above 88.72.
//! - GELU `x Phi(x) = x (1 + erf(x / sqrt 2)) / 2`: at most 1 ulp for `x >= 0`, 3 ulp for
//!   `-1 <= x < 0`, 4 ulp for `x < -1` (every `f32` of `[-16, -1]` checked too; tiny results
//!   keep their relative accuracy down into the subnormals; below about -14.5 the result is -0).
//!   Beyond `|x| = 16` it is `x` or -0 exactly.
//! - GELU gradient `Phi(x) + x phi(x)`: absolute error at most 1.26e-7 (~1 ulp of values
//!   near 1; the gradient peaks at 1.13), and at most 4.8 ulps of the larger of its two terms
//!   (the terms cancel where the gradient crosses zero, at x = -0.7518, so relative to the
//!   gradient itself the error grows there).

/// `f32` lanes: one value ([`f32`]) or eight (`avx2::V8`). Each method is one exactly rounded
/// operation, the same on both, so a function generic over `Lanes` is bitwise the same on both.
trait Lanes: Copy {
    fn splat(v: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self * b + c` rounded once.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn abs(self) -> Self;
    /// `self`'s magnitude with `sign`'s sign bit.
    fn copysign(self, sign: Self) -> Self;
    /// `neg` where `sign`'s sign bit is set (-0 and NaNs with the bit included), else `other`.
    fn select_neg(sign: Self, neg: Self, other: Self) -> Self;
    /// `yes` where `a <= b` (false for NaN), else `no`.
    fn select_le(a: Self, b: Self, yes: Self, no: Self) -> Self;
    /// `self` clamped to `[lo, hi]`; NaN stays NaN.
    fn clamp(self, lo: f32, hi: f32) -> Self;
    /// The smaller of `self` and `hi`; NaN stays NaN.
    fn at_most(self, hi: f32) -> Self;
    /// The larger of `self` and `lo`, `self` where they are equal (so `at_least(-0.0)` keeps
    /// +0); NaN stays NaN.
    fn at_least(self, lo: f32) -> Self;
    /// `2^n` for an integer-valued `n` in `[-126, 127]`, built in the exponent field.
    fn pow2i(n: Self) -> Self;
    /// `j`'s bits shifted left by 23 as an `f32`: where `j`'s bits end in `k` (9 bits) above a
    /// multiple of 512, `2^(k - 127)` for `k` in `[1, 254]`, built without a conversion.
    fn pow2_low_bits(j: Self) -> Self;
}

impl Lanes for f32 {
    #[inline(always)]
    fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        f32::mul_add(self, b, c)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        f32::copysign(self, sign)
    }
    #[inline(always)]
    fn select_neg(sign: Self, neg: Self, other: Self) -> Self {
        if sign.is_sign_negative() {
            neg
        } else {
            other
        }
    }
    #[inline(always)]
    fn select_le(a: Self, b: Self, yes: Self, no: Self) -> Self {
        if a <= b {
            yes
        } else {
            no
        }
    }
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        // Not `f32::clamp`/`max`, which would turn NaN into a bound.
        if self < lo {
            lo
        } else if self > hi {
            hi
        } else {
            self
        }
    }
    #[inline(always)]
    fn at_most(self, hi: f32) -> Self {
        // Not `f32::min`, which would turn NaN into `hi`.
        if self > hi {
            hi
        } else {
            self
        }
    }
    #[inline(always)]
    fn at_least(self, lo: f32) -> Self {
        if self < lo {
            lo
        } else {
            self
        }
    }
    #[inline(always)]
    fn pow2i(n: Self) -> Self {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    fn pow2_low_bits(j: Self) -> Self {
        f32::from_bits(j.to_bits() << 23)
    }
}

/// Two sets of lanes side by side, each operation applied to both: one call of a function
/// generic over [`Lanes`] then works on two independent vectors, interleaved, so their
/// dependency chains overlap and each constant is materialized once for both.
impl<L: Lanes> Lanes for (L, L) {
    #[inline(always)]
    fn splat(v: f32) -> Self {
        (L::splat(v), L::splat(v))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        (self.0.add(o.0), self.1.add(o.1))
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        (self.0.sub(o.0), self.1.sub(o.1))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        (self.0.mul(o.0), self.1.mul(o.1))
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        (self.0.div(o.0), self.1.div(o.1))
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        (self.0.mul_add(b.0, c.0), self.1.mul_add(b.1, c.1))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        (self.0.abs(), self.1.abs())
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        (self.0.copysign(sign.0), self.1.copysign(sign.1))
    }
    #[inline(always)]
    fn select_neg(sign: Self, neg: Self, other: Self) -> Self {
        (
            L::select_neg(sign.0, neg.0, other.0),
            L::select_neg(sign.1, neg.1, other.1),
        )
    }
    #[inline(always)]
    fn select_le(a: Self, b: Self, yes: Self, no: Self) -> Self {
        (
            L::select_le(a.0, b.0, yes.0, no.0),
            L::select_le(a.1, b.1, yes.1, no.1),
        )
    }
    #[inline(always)]
    fn clamp(self, lo: f32, hi: f32) -> Self {
        (self.0.clamp(lo, hi), self.1.clamp(lo, hi))
    }
    #[inline(always)]
    fn at_most(self, hi: f32) -> Self {
        (self.0.at_most(hi), self.1.at_most(hi))
    }
    #[inline(always)]
    fn at_least(self, lo: f32) -> Self {
        (self.0.at_least(lo), self.1.at_least(lo))
    }
    #[inline(always)]
    fn pow2i(n: Self) -> Self {
        (L::pow2i(n.0), L::pow2i(n.1))
    }
    #[inline(always)]
    fn pow2_low_bits(j: Self) -> Self {
        (L::pow2_low_bits(j.0), L::pow2_low_bits(j.1))
    }
}

/// Adding then subtracting `1.5 * 2^23` rounds an `f32` below `2^22` in magnitude to the
/// nearest integer (ties to even), with plain adds that vectorize.
const SHIFTER: f32 = 12_582_912.0;

#[inline(always)]
fn round_int<L: Lanes>(v: L) -> L {
    v.add(L::splat(SHIFTER)).sub(L::splat(SHIFTER))
}

/// `c[0] + c[1] t + ... + c[k] t^k` in Horner form with FMAs.
#[inline(always)]
fn horner<L: Lanes, const K: usize>(t: L, c: &[f32; K]) -> L {
    let mut p = L::splat(c[K - 1]);
    for &ci in c[..K - 1].iter().rev() {
        p = p.mul_add(t, L::splat(ci));
    }
    p
}

/// `c[0] + t (c[1] + c[2] t + ... + c[10] t^9)`: the inner polynomial in Estrin's form (pairs
/// joined by `t^2`, `t^4`, `t^8`), a short dependency chain where Horner's form would wait on ten
/// FMAs in a row; the outer step in Horner's form, so that the value rounds once at its full
/// magnitude (Estrin's form alone rounds three partial sums of that size, 1.5 ulps more error).
#[inline(always)]
fn estrin_tail<L: Lanes>(t: L, c: &[f32; 11]) -> L {
    let t2 = t.mul(t);
    let t4 = t2.mul(t2);
    let t8 = t4.mul(t4);
    let pair = |k: usize| t.mul_add(L::splat(c[k + 1]), L::splat(c[k]));
    let p14 = t2.mul_add(pair(3), pair(1));
    let p58 = t2.mul_add(pair(7), pair(5));
    let p110 = t8.mul_add(pair(9), t4.mul_add(p58, p14));
    t.mul_add(p110, L::splat(c[0]))
}

/// `exp(a - lo) = m * 2^n` with `m` in `[0.7, 1.42]` and `n` integer-valued, for `a` in
/// `[-110, 89]` and `|lo|` below `ulp(a)`: the `lo` term lets callers pass an argument carried
/// in two floats (exactly `-x^2 / 2`).
#[inline(always)]
fn exp_parts<L: Lanes>(a: L, lo: L) -> (L, L) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Cephes' split of ln 2: LN2_HI has 9 significant bits, so `n * LN2_HI` is exact and the
    // reduction `a - n * LN2_HI` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Cephes' `expf` minimax polynomial: exp(r) = 1 + r + r^2 P(r) on |r| <= ln(2) / 2.
    const P: [f32; 6] = [
        0.5,
        1.666_666_5e-1,
        4.166_579_6e-2,
        8.333_452e-3,
        1.398_2e-3,
        1.987_569_1e-4,
    ];
    let n = a
        .mul_add(L::splat(LOG2E), L::splat(SHIFTER))
        .sub(L::splat(SHIFTER));
    let r = n.mul_add(L::splat(-LN2_HI), a);
    let r = n.mul_add(L::splat(-LN2_LO), r).sub(lo);
    let m = horner(r, &P).mul_add(r.mul(r), r).add(L::splat(1.0));
    (m, n)
}

/// `v * 2^n` for an integer-valued `n` in `[-252, 254]`, rounded once: `2^n` is applied as two
/// normal powers of two, the first product is exact (it stays normal for `v` in `exp_parts`'
/// range), so results in the subnormal range round once, and 0 comes out where they underflow.
#[inline(always)]
fn ldexp<L: Lanes>(v: L, n: L) -> L {
    let half = round_int(n.mul(L::splat(0.5)));
    v.mul(L::pow2i(half)).mul(L::pow2i(n.sub(half)))
}

/// `exp(x)`; 0 for `x < -103.98` (and `-inf`), `+inf` above 88.72, NaN for NaN.
#[inline(always)]
fn exp<L: Lanes>(x: L) -> L {
    // Past these bounds the result is already 0 or +inf; the clamp keeps `n` in ldexp's range.
    let x = x.clamp(-110.0, 89.0);
    let (m, n) = exp_parts(x, L::splat(0.0));
    ldexp(m, n)
}

/// `|x|` beyond which GELU and its gradient take the `erfc` form (`erf` polynomial below).
const SMALL: f32 = 1.0;
/// `|x|` is clamped here: exp(-16^2 / 2) underflows `f32`, so GELU is `x` or -0 beyond it.
const BIG: f32 = 16.0;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `erf(x / sqrt 2) / (2 x)` as a polynomial in `x^2` for `|x| <= SMALL`: a relative-error fit
/// with coefficients rounded to `f32` one at a time (each refit after the previous rounding).
const ERF_SMALL: [f32; 7] = [
    0.398_942_3,
    -0.066_491_17,
    0.009_982_62,
    -0.001_225_464_9,
    0.000_188_180_58,
    -7.350_145e-5,
    2.180_089_2e-5,
];

/// `erfcx(w) / (2 t) = exp(w^2) erfc(w) (1 + sqrt(2) w) / 2` as a polynomial in
/// `t = 1 / (1 + sqrt(2) w)`, fitted like [`ERF_SMALL`] for `w = |x| / sqrt 2` in
/// `[SMALL, BIG] / sqrt 2` (relative error of the fit 7e-9). With `|x| = sqrt(2) w`,
/// `t = 1 / (1 + |x|)`.
const ERFCX_HALF: [f32; 11] = [
    0.398_939_07,
    0.399_137_94,
    -0.004_928_383,
    -0.731_833_9,
    -1.291_908_6,
    4.161_684,
    7.529_513,
    -45.758_175,
    82.562_096,
    -71.160_59,
    24.950_764,
];

/// `exp(r) = 1 + r + r^2 Q(r)` on `|r| <= ln(2) / 2` (a little beyond, for the rounding of `r`):
/// a relative-error minimax fit of degree 6 (Cephes' `expf` has degree 7), coefficients rounded
/// to `f32` one at a time (each refit after the previous rounding); relative error of the fit
/// 3.3e-9, a twentieth of an ulp.
const EXP_Q: [f32; 5] = [
    0.499_999_94,
    0.166_665_15,
    0.041_668_087,
    0.008_369_298,
    0.001_383_828_2,
];
/// The coefficients of `Q(rho / 2) / 4`, [`EXP_Q`]'s scaled by powers of 2 (exactly).
const EXP_Q_RHO: [f32; 5] = [
    EXP_Q[0] / 4.0,
    EXP_Q[1] / 8.0,
    EXP_Q[2] / 16.0,
    EXP_Q[3] / 32.0,
    EXP_Q[4] / 64.0,
];

/// The tail of GELU and of its gradient is carried scaled by `2^SCALE`, so that it stays
/// normal down to `exp(-16^2 / 2) = 2^-184.7`; the last product, by `UNSCALE = 2^-SCALE`,
/// rounds it once, into the subnormals if it is that small.
const SCALE: i32 = 100;
const UNSCALE: f32 = 1.0 / (1u128 << SCALE) as f32;
/// [`SHIFTER`] plus `SCALE + 127`: adding it still rounds to an integer, and its bits end in
/// `SCALE + 127` above a multiple of 512 (for [`Lanes::pow2_low_bits`]).
const POW2_SHIFTER: f32 = SHIFTER + (SCALE + 127) as f32;

/// What GELU and its gradient share for `x`: both forms, for every lane (no branches).
struct Normal<L> {
    /// `|x|` clamped to `BIG` (NaN stays NaN).
    ax: L,
    /// `x^2` rounded.
    x2: L,
    /// `exp(-x^2 / 2) = (1 + s) 2^n`: `s` (not `1 + s`, which would round) and `2^(n + SCALE)`.
    s: L,
    scale: L,
    /// `t = 1 / (1 + |x|)` and `h(t)`, so that `erfcx(|x| / sqrt 2) / 2 = t h` and
    /// `Phi(-|x|) = (1 + s) 2^n t h`; valid for `|x| > SMALL`.
    t: L,
    h: L,
    /// `erf(x / sqrt 2) / (2 x)`, valid for `|x| <= SMALL`.
    erf_small: L,
}

#[inline(always)]
fn normal<L: Lanes>(x: L) -> Normal<L> {
    const NEG_HALF_LOG2E: f32 = -0.5 * std::f32::consts::LOG2_E;
    // Cephes' split of ln 2, as in `exp_parts`.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let ax = x.abs().at_most(BIG);
    let x2 = ax.mul(ax);
    // The exact rounding error of x^2, so x^2 = x2 + x2_lo exactly: exp(-x^2/2) keeps its
    // relative accuracy where x^2 is large (an error of ulp(x^2) in the exponent is 2e-6
    // relative at x = 10).
    let x2_lo = ax.mul_add(ax, x2.mul(L::splat(-1.0)));
    // n = round(-x2 log2(e) / 2), in [-185, 0]. j = n + POW2_SHIFTER is an integer whose bits
    // end in n + SCALE + 127, which `pow2_low_bits` turns into 2^(n + SCALE) with one shift.
    let j = x2.mul_add(L::splat(NEG_HALF_LOG2E), L::splat(POW2_SHIFTER));
    let n = j.sub(L::splat(POW2_SHIFTER));
    // rho = -x^2 - 2 n ln 2 is twice the reduced argument r = -x^2/2 - n ln 2, which lets
    // -x2 and -x2_lo go into the FMAs unhalved: the first part is exact (as in `exp_parts`),
    // the small rest is computed beside it. Then s = r + r^2 Q(r) = rho/2 + rho^2 Q(rho/2) / 4,
    // Q(rho/2) / 4 in Estrin's form for a short dependency chain, bitwise the same steps as in
    // r scaled by powers of 2; the last FMA is the only rounding at the full size of s.
    let hi = n.mul_add(L::splat(-2.0 * LN2_HI), x2.mul(L::splat(-1.0)));
    let lo = n.mul_add(L::splat(-2.0 * LN2_LO), x2_lo.mul(L::splat(-1.0)));
    let rho = hi.add(lo);
    let rho2 = rho.mul(rho);
    let c = |k: usize| L::splat(EXP_Q_RHO[k]);
    let q = rho2.mul_add(
        rho2.mul_add(c(4), rho.mul_add(c(3), c(2))),
        rho.mul_add(c(1), c(0)),
    );
    let s = q.mul_add(rho2, rho.mul(L::splat(0.5)));
    let t = L::splat(1.0).div(ax.add(L::splat(1.0)));
    Normal {
        ax,
        x2,
        s,
        scale: L::pow2_low_bits(j),
        t,
        h: estrin_tail(t, &ERFCX_HALF),
        erf_small: horner(x2, &ERF_SMALL),
    }
}

/// `x Phi(x)`. For `|x| <= SMALL`, `x / 2 + x^2 erf(x / sqrt 2) / (2 x)`; beyond, with
/// `P = Phi(-|x|)`, `x P = -|x| P` for negative `x` and `x - |x| P` for positive `x` (no
/// cancellation: `|x| P <= x / 6`).
#[inline(always)]
fn gelu<L: Lanes>(x: L) -> L {
    let f = normal(x);
    // The sign of `x` for x = -0 too (the sum below gives +0 there).
    let small = f.x2.mul_add(f.erf_small, x.mul(L::splat(0.5))).copysign(x);
    // |x| P 2^SCALE = (|x| t) 2^(n + SCALE) h (1 + s): |x| t = 1 - t rounded once (more
    // accurate than |x| t, which would carry t's error in full), the scaling exact, and
    // h (1 + s) rounded once.
    let mh = f.s.mul_add(f.h, f.h);
    let w = L::splat(1.0).sub(f.t).mul(f.scale).mul(mh);
    // x - |x| P for positive x, -|x| P for negative x (the -0 keeps the sign of a zero
    // product), in one FMA; the scale 2^-SCALE inside it, so tiny results round once even
    // when subnormal.
    let big = w.mul_add(L::splat(-UNSCALE), x.at_least(-0.0));
    L::select_le(f.ax, L::splat(SMALL), small, big)
}

/// `gelu'(x) = Phi(x) + x phi(x)`. For `|x| <= SMALL`, `1/2 + x (erf(x / sqrt 2) / (2 x) +
/// phi(x))`; beyond, `e (erfcx / 2 - |x| / sqrt(2 pi))` for negative `x` and
/// `1 - e (erfcx / 2 - |x| / sqrt(2 pi))` for positive `x`, with `e = exp(-x^2 / 2)` (the terms
/// cancel near the zero at x = -0.7518).
#[inline(always)]
fn gelu_grad<L: Lanes>(x: L) -> L {
    let f = normal(x);
    // exp(-x^2 / 2) is normal here (|x| <= 1): scaling it first loses nothing.
    let p2n = f.scale.mul(L::splat(UNSCALE));
    let e = f.s.mul_add(p2n, p2n);
    let small = x.mul_add(
        e.mul_add(L::splat(FRAC_1_SQRT_2PI), f.erf_small),
        L::splat(0.5),
    );
    // (t h - |x| / sqrt(2 pi)) 2^(n + SCALE), rounded once: the factors scaled first (exactly),
    // off the dependency chain of h.
    let ts = f.t.mul(f.scale);
    let cs = f.ax.mul(L::splat(FRAC_1_SQRT_2PI)).mul(f.scale);
    let v = ts.mul_add(f.h, cs.mul(L::splat(-1.0)));
    let q = f.s.mul_add(v, v);
    // The scale 2^-SCALE last, as in `gelu`, so the tail rounds once into the subnormals.
    let neg = q.mul(L::splat(UNSCALE));
    let pos = q.mul_add(L::splat(-UNSCALE), L::splat(1.0));
    let big = L::select_neg(x, neg, pos);
    L::select_le(f.ax, L::splat(SMALL), small, big)
}

/// The AVX2 + FMA lanes and the entry points that use them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Eight `f32` lanes. Values of this type are only made inside this module's
    /// `#[target_feature(enable = "avx2,fma")]` functions, which callers run only after
    /// checking that the CPU has AVX2 and FMA ([`super::has_avx2_fma`]); that is what makes the
    /// intrinsics in the methods below sound.
    #[derive(Clone, Copy)]
    pub(super) struct V8(__m256);

    // SAFETY (for every `unsafe` block in this impl): the intrinsics are pure value operations
    // that need AVX2/FMA, and a `V8` exists only while running on a CPU that has them (see the
    // type's docs).
    impl Lanes for V8 {
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_mul_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_div_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn abs(self) -> Self {
            // SAFETY: see the impl.
            V8(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        fn copysign(self, sign: Self) -> Self {
            // SAFETY: see the impl.
            unsafe {
                let bit = _mm256_set1_ps(-0.0);
                V8(_mm256_or_ps(
                    _mm256_andnot_ps(bit, self.0),
                    _mm256_and_ps(bit, sign.0),
                ))
            }
        }
        #[inline(always)]
        fn select_neg(sign: Self, neg: Self, other: Self) -> Self {
            // SAFETY: see the impl. `blendv` selects by the mask's sign bit.
            V8(unsafe { _mm256_blendv_ps(other.0, neg.0, sign.0) })
        }
        #[inline(always)]
        fn select_le(a: Self, b: Self, yes: Self, no: Self) -> Self {
            // SAFETY: see the impl. `_CMP_LE_OQ` is false when either side is NaN.
            unsafe {
                let le = _mm256_cmp_ps::<_CMP_LE_OQ>(a.0, b.0);
                V8(_mm256_blendv_ps(no.0, yes.0, le))
            }
        }
        #[inline(always)]
        fn clamp(self, lo: f32, hi: f32) -> Self {
            // SAFETY: see the impl. `max`/`min` return their second operand when either is
            // NaN, so `self` goes second and a NaN passes through.
            unsafe {
                let v = _mm256_max_ps(_mm256_set1_ps(lo), self.0);
                V8(_mm256_min_ps(_mm256_set1_ps(hi), v))
            }
        }
        #[inline(always)]
        fn at_most(self, hi: f32) -> Self {
            // SAFETY: see the impl. `min` returns its second operand when either is NaN.
            V8(unsafe { _mm256_min_ps(_mm256_set1_ps(hi), self.0) })
        }
        #[inline(always)]
        fn at_least(self, lo: f32) -> Self {
            // SAFETY: see the impl. `max` returns its second operand when either is NaN or
            // both are zeros.
            V8(unsafe { _mm256_max_ps(_mm256_set1_ps(lo), self.0) })
        }
        #[inline(always)]
        fn pow2i(n: Self) -> Self {
            // SAFETY: see the impl. `n` is integer-valued, so the conversion is exact.
            unsafe {
                let e = _mm256_add_epi32(_mm256_cvtps_epi32(n.0), _mm256_set1_epi32(127));
                V8(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
            }
        }
        #[inline(always)]
        fn pow2_low_bits(j: Self) -> Self {
            // SAFETY: see the impl. An integer shift, the same as the scalar code's.
            V8(unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(j.0))) })
        }
    }

    /// `f` on eight lanes read from `src` (at least 8 long).
    #[inline(always)]
    fn load(src: &[f32]) -> V8 {
        assert!(src.len() >= 8);
        // SAFETY: see `V8`; the unaligned load reads `src[..8]`, in bounds (asserted).
        V8(unsafe { _mm256_loadu_ps(src.as_ptr()) })
    }

    #[inline(always)]
    fn store(v: V8, dst: &mut [f32]) {
        assert!(dst.len() >= 8);
        // SAFETY: see `V8`; the unaligned store writes `dst[..8]`, in bounds (asserted).
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v.0) }
    }

    // The loops below handle the last partial group of eight through a zero-padded copy, so
    // every element takes the vector path (the scalar `mul_add` would be a libm call here).
    // GELU and its gradient go sixteen at a time, as a pair of `V8`: the two dependency chains
    // overlap, and each constant is broadcast once for both (about 10% faster than eight at a
    // time, and more pairs run out of registers).

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_in_place(y: &mut [f32]) {
        let n = y.len();
        let mut i = 0;
        while i + 8 <= n {
            let v = super::exp(load(&y[i..]));
            store(v, &mut y[i..]);
            i += 8;
        }
        if i < n {
            let mut group = [0.0f32; 8];
            group[..n - i].copy_from_slice(&y[i..]);
            store(super::exp(load(&group)), &mut group);
            y[i..].copy_from_slice(&group[..n - i]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(x: &[f32], y: &mut [f32]) {
        let n = y.len();
        let x = &x[..n];
        let mut i = 0;
        while i + 16 <= n {
            let (a, b) = super::gelu((load(&x[i..]), load(&x[i + 8..])));
            store(a, &mut y[i..]);
            store(b, &mut y[i + 8..]);
            i += 16;
        }
        while i + 8 <= n {
            store(super::gelu(load(&x[i..])), &mut y[i..]);
            i += 8;
        }
        if i < n {
            let (mut xb, mut yb) = ([0.0f32; 8], [0.0f32; 8]);
            xb[..n - i].copy_from_slice(&x[i..]);
            store(super::gelu(load(&xb)), &mut yb);
            y[i..].copy_from_slice(&yb[..n - i]);
        }
    }

    /// GELU of eight lanes in a register, for the GEMM's epilogue.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn gelu_m256(x: __m256) -> __m256 {
        super::gelu(V8(x)).0
    }

    /// `dx[..8]`, or zeros where the gradient is overwritten (`ACC` false), as the FMA's
    /// addend: `dy g + 0` rounds as the accumulation into a zeroed `dx` does.
    #[inline(always)]
    fn addend<const ACC: bool>(dx: &[f32]) -> V8 {
        if ACC {
            load(dx)
        } else {
            V8::splat(0.0)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu_grad<const ACC: bool>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let n = dx.len();
        let (x, dy) = (&x[..n], &dy[..n]);
        let mut i = 0;
        while i + 16 <= n {
            let (g, h) = super::gelu_grad((load(&x[i..]), load(&x[i + 8..])));
            store(
                load(&dy[i..]).mul_add(g, addend::<ACC>(&dx[i..])),
                &mut dx[i..],
            );
            let j = i + 8;
            store(
                load(&dy[j..]).mul_add(h, addend::<ACC>(&dx[j..])),
                &mut dx[j..],
            );
            i += 16;
        }
        while i + 8 <= n {
            let g = super::gelu_grad(load(&x[i..]));
            store(
                load(&dy[i..]).mul_add(g, addend::<ACC>(&dx[i..])),
                &mut dx[i..],
            );
            i += 8;
        }
        if i < n {
            let (mut xb, mut db, mut ob) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
            xb[..n - i].copy_from_slice(&x[i..]);
            db[..n - i].copy_from_slice(&dy[i..]);
            ob[..n - i].copy_from_slice(&dx[i..]);
            let g = super::gelu_grad(load(&xb));
            store(load(&db).mul_add(g, addend::<ACC>(&ob)), &mut ob);
            dx[i..].copy_from_slice(&ob[..n - i]);
        }
    }
}

/// Measured bound on the gradient's error in ulps of its larger term (module docs).
#[cfg(test)]
const GRAD_ULPS: f64 = 4.8;

/// Whether the CPU has AVX2 and FMA (cached by the standard library after the first call).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Runs `f` compiled for AVX2 when the CPU has it, else as is: for loops the compiler
/// vectorizes itself (the softmax's `f64` sums), whose results do not depend on the vector width
/// (Rust never contracts `a * b + c` into an FMA nor reorders float operations). Pass the
/// closure with `#[inline(always)]`: one that LLVM leaves out of line is compiled without AVX2.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `y[i] = exp(y[i])` (see [`exp`]).
pub(crate) fn exp_in_place(y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { avx2::exp_in_place(y) };
        return;
    }
    for v in y {
        *v = exp(*v);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::gelu_m256;

/// `y = x Phi(x)` elementwise over `y.len()` elements (see [`gelu`]).
pub(crate) fn gelu_forward(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { avx2::gelu(x, y) };
        return;
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = gelu(v);
    }
}

/// `dx += dy gelu'(x)` elementwise over `dx.len()` elements, rounded once (one FMA); where
/// not `accumulate`, `dx = dy gelu'(x) + 0` without reading `dx` (bitwise the accumulation
/// into zeros).
pub(crate) fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe {
            match accumulate {
                true => avx2::gelu_grad::<true>(x, dy, dx),
                false => avx2::gelu_grad::<false>(x, dy, dx),
            }
        }
        return;
    }
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        *o = d.mul_add(gelu_grad(v), if accumulate { *o } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in ulps between two finite `f32`s (across zero and the subnormals too).
    fn ulps(a: f32, b: f32) -> u64 {
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b < 0x8000_0000 {
                b
            } else {
                0x8000_0000 - b
            }
        };
        (key(a) - key(b)).unsigned_abs()
    }

    /// Every `step`-th `f32` bit pattern from `lo` up to `hi` (same sign), both ends included.
    fn sweep(lo: f32, hi: f32, step: u32) -> impl Iterator<Item = f32> {
        let (a, b) = (lo.to_bits(), hi.to_bits());
        let (a, b) = (a.min(b), a.max(b));
        (a..=b)
            .step_by(step as usize)
            .chain([b])
            .map(f32::from_bits)
    }

    fn gelu64(x: f64) -> f64 {
        0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }

    fn gelu_grad64(x: f64) -> f64 {
        let cdf = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
        cdf + x
            * libm::exp(-0.5 * x * x)
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI)
            * std::f64::consts::FRAC_1_SQRT_2
    }

    /// The vector entry points on `x`, checked bitwise against the scalar functions.
    fn vector(x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut y = vec![f32::NAN; x.len()];
        gelu_forward(x, &mut y);
        let mut g = vec![0.0f32; x.len()];
        gelu_backward(x, &vec![1.0; x.len()], &mut g, true);
        let mut e = x.to_vec();
        exp_in_place(&mut e);
        (y, g, e)
    }

    fn all_f32s(lo: f32, hi: f32, step: u32) -> Vec<f32> {
        let mut x: Vec<f32> = sweep(lo.max(0.0), hi.max(0.0), step).collect();
        if lo < 0.0 {
            x.extend(sweep(-0.0, lo, step));
        }
        x
    }

    /// The larger of the two terms of `gelu'(x) = Phi(x) + x phi(x)`: the gradient's error is
    /// measured in ulps of it, since the terms cancel where the gradient crosses zero.
    fn grad_scale(x: f64) -> f64 {
        let cdf = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
        cdf.max((gelu_grad64(x) - cdf).abs())
    }

    fn ulp_of(v: f64) -> f64 {
        let v = (v as f32).abs();
        (f32::from_bits(v.to_bits() + 1) - v) as f64
    }

    /// Worst errors over `x`: GELU ulps for x >= 0, -1 <= x < 0, x < -1; the gradient's
    /// absolute error and its error in ulps of [`grad_scale`]; `exp` ulps.
    fn worst_errors(x: &[f32]) -> ([u64; 3], f64, f64, u64) {
        let (y, g, e) = vector(x);
        let (mut gelu, mut grad_abs, mut grad_ulps, mut exp_ulps) = ([0; 3], 0.0f64, 0.0f64, 0);
        for i in 0..x.len() {
            let v = x[i] as f64;
            let range = if v >= 0.0 {
                0
            } else if v >= -1.0 {
                1
            } else {
                2
            };
            gelu[range] = gelu[range].max(ulps(y[i], gelu64(v) as f32));
            let err = (g[i] as f64 - gelu_grad64(v)).abs();
            grad_abs = grad_abs.max(err);
            grad_ulps = grad_ulps.max(err / ulp_of(grad_scale(v)));
            if x[i] < 88.72 {
                exp_ulps = exp_ulps.max(ulps(e[i], libm::exp(v) as f32));
            }
        }
        (gelu, grad_abs, grad_ulps, exp_ulps)
    }

    #[test]
    #[ignore = "the dense sweep behind the bounds in the module docs (minutes); run in release"]
    fn print_error_bounds() {
        let (gelu, grad_abs, grad_ulps, _) = worst_errors(&all_f32s(-16.0, 16.0, 3));
        let (_, _, _, exp_ulps) = worst_errors(&all_f32s(-110.0, 89.0, 3));
        println!(
            "gelu ulps (x >= 0, -1 <= x < 0, x < -1) {gelu:?}; gradient absolute {grad_abs:e}, \
             in ulps of the larger term {grad_ulps:.2}; exp ulps {exp_ulps}"
        );
    }

    #[test]
    fn accuracy_against_libm() {
        // Every 61st f32 of each range (~20 million values) and a linear grid through the
        // ranges' borders; the bounds are those measured on every 3rd f32 (module docs).
        let mut x = all_f32s(-16.0, 16.0, 61);
        x.extend((-20_000..=20_000).map(|i| i as f32 * 7.3e-4));
        let (gelu, grad_abs, grad_ulps, _) = worst_errors(&x);
        assert!(
            gelu[0] <= 1 && gelu[1] <= 3 && gelu[2] <= 4,
            "gelu ulps {gelu:?}"
        );
        assert!(grad_abs <= 1.26e-7, "gradient absolute error {grad_abs:e}");
        assert!(
            grad_ulps <= GRAD_ULPS,
            "gradient error {grad_ulps} ulps of its larger term"
        );
        let (_, _, _, exp_ulps) = worst_errors(&all_f32s(-110.0, 89.0, 61));
        assert!(exp_ulps <= 1, "exp ulps {exp_ulps}");
    }

    #[test]
    fn special_values() {
        let x = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -40.0,
            40.0,
            -16.5,
        ];
        let (y, g, e) = vector(&x);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let nan = f32::NAN.to_bits();
        let want_y = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            -0.0,
            f32::NAN,
            -0.0,
            40.0,
            -0.0,
        ];
        assert_eq!(bits(&y)[..4], bits(&want_y)[..4]);
        assert!(y[4].is_nan());
        assert_eq!(bits(&y)[5..], bits(&want_y)[5..]);
        assert_eq!(g[..4], [0.5, 0.5, 1.0, 0.0]);
        assert!(g[4].is_nan());
        assert_eq!(g[5..], [0.0, 1.0, 0.0]);
        assert_eq!(e[..4], [1.0, 1.0, f32::INFINITY, 0.0]);
        assert!(e[4].is_nan() && bits(&e)[4] & 0x7fc0_0000 == nan & 0x7fc0_0000);
        let x = [-40.0, 40.0, -16.5, -103.0, -87.0, 88.0, -1e-30, 1e-30];
        let (_, _, e) = vector(&x);
        for (&v, &got) in x.iter().zip(&e) {
            assert!(
                ulps(got, libm::exp(v as f64) as f32) <= 1,
                "exp({v}) = {got}"
            );
        }
        let (_, _, e) = vector(&[-104.0, -200.0, 89.0, -1e-30, 1e-30]);
        assert_eq!(e, [0.0, 0.0, f32::INFINITY, 1.0, 1.0]);
    }

    #[test]
    fn gelu_goes_to_zero_smoothly_in_the_negative_tail() {
        // Down to the subnormals and past them: never positive, never growing in magnitude.
        let x: Vec<f32> = (0..=70_000).map(|i| -9.0 - i as f32 * 1e-4).collect();
        let (y, g, _) = vector(&x);
        for i in 1..x.len() {
            assert!(y[i] <= 0.0 && y[i] >= y[i - 1], "gelu({}) = {}", x[i], y[i]);
            assert!(
                g[i] <= 0.0 && g[i] >= g[i - 1],
                "gelu'({}) = {}",
                x[i],
                g[i]
            );
        }
        assert_eq!(y[x.len() - 1].to_bits(), (-0.0f32).to_bits());
    }

    /// Single-threaded ns per element of [`gelu_forward`] and [`gelu_backward`] on 2^20 standard
    /// normal inputs (the spread of pre-activations), the best of several calls. Timing only:
    /// `cargo test --release -p mae-backend-cpu --lib -- --ignored --nocapture gelu_speed`.
    #[test]
    #[ignore = "a timing, not a check: run it by hand in release"]
    fn gelu_speed() {
        let n = 1 << 20;
        // Box-Muller on a 64-bit LCG: a fixed, dependency-free N(0, 1) sample.
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let x: Vec<f32> = (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let (mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n]);
        // Wall-clock time of single calls (~1.5 ms each), the best of many: short enough that
        // most samples run without being preempted on a shared machine.
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..25)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_nanos() as f64 / n as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        let forward = best(&mut || gelu_forward(&x, &mut y));
        let backward = best(&mut || gelu_backward(&x, &dy, &mut dx, true));
        std::hint::black_box((&y, &dx));
        println!("ns/element, one thread: gelu_forward {forward:.3} gelu_backward {backward:.3}");
    }

    #[test]
    fn vector_results_are_bitwise_the_scalar_results() {
        let mut x: Vec<f32> = (0..40_001)
            .map(|i| (i as f32 - 20_000.0) * 8.1e-4)
            .collect();
        x.extend(all_f32s(-110.0, 110.0, 40_009));
        x.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            1e-40,
        ]);
        // A length that is no multiple of eight: the vector code's padded last group too.
        x.push(-3.5);
        assert_ne!(x.len() % 8, 0);
        let dy: Vec<f32> = (0..x.len()).map(|i| ((i % 7) as f32 - 3.0) * 0.3).collect();
        let dx0: Vec<f32> = (0..x.len()).map(|i| (i % 5) as f32 * 0.1).collect();
        let (mut y, mut dx, mut e) = (vec![f32::NAN; x.len()], dx0.clone(), x.clone());
        let mut dx_new = vec![f32::NAN; x.len()];
        gelu_forward(&x, &mut y);
        gelu_backward(&x, &dy, &mut dx, true);
        gelu_backward(&x, &dy, &mut dx_new, false);
        exp_in_place(&mut e);
        for i in 0..x.len() {
            let want_dx = dy[i].mul_add(gelu_grad(x[i]), dx0[i]);
            let want_new = dy[i].mul_add(gelu_grad(x[i]), 0.0);
            assert_eq!(y[i].to_bits(), gelu(x[i]).to_bits(), "gelu({})", x[i]);
            assert_eq!(dx[i].to_bits(), want_dx.to_bits(), "gelu'({})", x[i]);
            assert_eq!(
                dx_new[i].to_bits(),
                want_new.to_bits(),
                "gelu'({}) new",
                x[i]
            );
            assert_eq!(e[i].to_bits(), exp(x[i]).to_bits(), "exp({})", x[i]);
        }
    }
}
