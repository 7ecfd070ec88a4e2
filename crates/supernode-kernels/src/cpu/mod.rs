//! The CPU's instruction set, detected once per process, and the kernel table chosen for it.
//!
//! [`Isa`] names the levels the kernels distinguish, each including the ones below it. The first
//! call to [`kernels`] detects the level ([`isa`]) and picks its [`Kernels`] table; every
//! dispatched kernel of the crate goes through that table, so the path, and with it the last
//! bits of the results that depend on it (FMA or not), is fixed for the whole process.
//!
//! - [`scalar`]: portable code, the reference orders;
//! - `avx2`: x86-64 AVX2, FMA and F16C;
//! - `avx512`: AVX-512 F/BW/VL (and, for the integer kernels and packed panels, VNNI).
//!
//! Module graph: the dispatching modules ([`crate::simd`], [`crate::qdot`], [`crate::ops`],
//! [`crate::matmul`]) call into this one; the ISA modules import only leaves (the shared orders and
//! types of `simd::{order, elem, rows}`, `qdot::{blocks, reference}`, `qdot::packed::layout`,
//! [`crate::quant`], [`crate::dtype`]), never a dispatching module.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod scalar;
mod table;

pub(crate) use table::{Gemm, Kernels};

/// The instruction-set levels of the kernels, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Portable code, no FMA.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F, BW and VL on top of [`Isa::Avx2`].
    Avx512,
    /// AVX-512 VNNI on top of [`Isa::Avx512`].
    Avx512Vnni,
}

impl Isa {
    /// Every level, in increasing order.
    #[cfg(test)]
    pub(crate) const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];

    /// The kernel table of this level. Only [`kernels`] and [`kernels_of`] hand tables out, and
    /// only for levels this machine has: that is what makes their `unsafe fn` entries callable.
    fn table(self) -> &'static Kernels {
        #[cfg(target_arch = "x86_64")]
        match self {
            Isa::Scalar => &scalar::KERNELS,
            Isa::Avx2 => &avx2::KERNELS,
            Isa::Avx512 => &avx512::KERNELS,
            Isa::Avx512Vnni => &avx512::KERNELS_VNNI,
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {
            Isa::Scalar => &scalar::KERNELS,
            _ => unreachable!("{self:?} is detected on x86-64 only"),
        }
    }
}

/// The best level of this machine (detected on first use, then fixed for the process).
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        Isa::Scalar
    } else if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl"))
    {
        Isa::Avx2
    } else if !is_x86_feature_detected!("avx512vnni") {
        Isa::Avx512
    } else {
        Isa::Avx512Vnni
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Scalar
}

/// The kernel table of this machine's level, chosen once per process.
#[inline]
pub(crate) fn kernels() -> &'static Kernels {
    static KERNELS: OnceLock<&'static Kernels> = OnceLock::new();
    KERNELS.get_or_init(|| isa().table())
}

/// The kernel table of `isa` if this machine has that level (tests run every path it has).
#[cfg(test)]
pub(crate) fn kernels_of(isa: Isa) -> Option<&'static Kernels> {
    (isa <= self::isa()).then(|| isa.table())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_level_is_the_best_one_detected() {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            let vnni = avx512 && is_x86_feature_detected!("avx512vnni");
            let want = match (avx2, avx512, vnni) {
                (false, ..) => Isa::Scalar,
                (true, false, _) => Isa::Avx2,
                (true, true, false) => Isa::Avx512,
                (true, true, true) => Isa::Avx512Vnni,
            };
            assert_eq!(isa(), want);
        }
        assert!(std::ptr::eq(kernels(), isa().table()));
        assert!(Isa::ALL
            .iter()
            .all(|&l| kernels_of(l).is_some() == (l <= isa())));
    }
}
