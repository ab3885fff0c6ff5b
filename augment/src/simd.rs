//! Function multiversioning: hot loops are written once as plain f32 code the compiler
//! vectorises, and compiled twice: for the baseline target and with AVX2 + FMA, picked at
//! run time (the check is a cached atomic load). No hand-written intrinsics.
//!
//! Each body sees a `const FMA: bool`: whether its build has hardware fused multiply-add.
//! Helpers that use one take it as a parameter ([`fma`], [`unit_u8`]), so a baseline x86-64
//! build never calls the (correct but slow) software `fmaf`.

/// Defines `fn name(args)` that runs an AVX2 build of `body` when the CPU has it.
/// The body should only call `#[inline(always)]` helpers so they get the same features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    #[allow(dead_code)]
                    const FMA: bool = true;
                    $body
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature `avx2` was compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $(-> $ret)? {
                #[allow(dead_code)]
                const FMA: bool = $crate::simd::NATIVE_FMA;
                $body
            }
            generic($($arg),*)
        }
    };
}

/// Whether the baseline build has hardware fused multiply-add.
pub(crate) const NATIVE_FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// `a * b + c`, fused (one rounding) when `FMA`, else two roundings.
#[inline(always)]
pub(crate) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `floor(x)` for |x| < 2^22, exact, in plain float ops so it vectorises everywhere (no
/// SSE4.1 `roundps` needed, and no saturating `as i32` cast, which LLVM scalarises).
#[inline(always)]
pub(crate) fn floor_f32(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const MAGIC: f32 = 12_582_912.0;
    let t = (x + MAGIC) - MAGIC;
    if t > x { t - 1.0 } else { t }
}

/// `min(max(x, 0), 1)`.
#[inline(always)]
pub(crate) fn clip01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

/// `max(a, b)` as one compare-select (`vmaxps`). `f32::max` also handles NaN, which costs
/// an extra compare and blend per call in vector code; our values are never NaN.
#[inline(always)]
pub(crate) fn max_f32(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// `min(a, b)` as one compare-select (`vminps`); see [`max_f32`].
#[inline(always)]
pub(crate) fn min_f32(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

/// `x mod 1` for x in [-1, 2), applied twice as the official hue step does (`h - floor(h)`
/// then again before the sector lookup): a sum that rounds to 1.0 wraps to 0. Equal to
/// `floor`-based code on that range (the subtractions are exact), in two compare-selects.
#[inline(always)]
pub(crate) fn wrap_unit(x: f32) -> f32 {
    let y = if x < 0.0 { x + 1.0 } else { x };
    if y >= 1.0 { y - 1.0 } else { y }
}

/// `x / 255` as f32, bit for bit the division. With `FMA` it is one multiply and one fused
/// multiply-add, `x * HI + x * LO` with `HI + LO` = 1/255 to 48 bits (the test checks all
/// 256 inputs), about 3x the division's throughput; without, the division.
#[inline(always)]
pub(crate) fn unit_u8<const FMA: bool>(x: u8) -> f32 {
    const HI: f32 = 0.003_921_569;
    const LO: f32 = -2.319_175_8e-10;
    let x = f32::from(x);
    if FMA {
        x.mul_add(HI, x * LO)
    } else {
        x / 255.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_u8_is_the_division_for_every_byte() {
        for x in 0..=255u8 {
            let want = (f32::from(x) / 255.0).to_bits();
            assert_eq!(unit_u8::<true>(x).to_bits(), want, "{x}");
            assert_eq!(unit_u8::<false>(x).to_bits(), want, "{x}");
        }
    }
}
