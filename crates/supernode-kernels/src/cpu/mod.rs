//! The CPU's instruction set, detected once per process, and the kernel table chosen for it.
//!
//! [`Isa`] names the levels the kernels distinguish, each including the ones below it. The first
//! call to [`kernels`] detects the level ([`isa`]) and picks its [`Kernels`] table; every
//! dispatched kernel of the crate goes through that table, so the path, and with it the last
//! bits of the results that depend on it (FMA or not), is fixed for the whole process.
//!
//! - [`scalar`]: portable code, the reference orders;
//! - `avx2`: x86-64 AVX2, FMA and F16C;
//! - `avx512`: AVX-512 F/BW/VL (and, for the integer kernels and the packed panels, VNNI).
//!
//! In quantised precision every level gives the same bits (the tests compare each level this
//! machine has, down to a model's logits through [`ISA_ENV`]); in exact precision the scalar
//! level differs from the others in the last bits (no FMA).
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
    /// Every level with its name in [`ISA_ENV`], in increasing order (indexed by the level).
    const NAMED: [(Isa, &'static str); 4] = [
        (Isa::Scalar, "scalar"),
        (Isa::Avx2, "avx2"),
        (Isa::Avx512, "avx512"),
        (Isa::Avx512Vnni, "avx512-vnni"),
    ];

    fn name(self) -> &'static str {
        Isa::NAMED[self as usize].1
    }

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

/// The environment variable that caps the kernels' level at a lower one than the machine's
/// best (`scalar`, `avx2`, `avx512` or `avx512-vnni`): every level gives the same bits, so this
/// changes only the speed, and is how the tests hold one machine's paths to each other.
pub const ISA_ENV: &str = "SUPERNODE_ISA";

/// The level [`ISA_ENV`] asks for: `Ok(None)` when it is unset, an error naming the choices
/// when it names no level or one this machine (best level `found`) lacks.
fn requested(found: Isa) -> Result<Option<Isa>, String> {
    let v = std::env::var_os(ISA_ENV);
    parse_request(v.as_deref().map(|v| v.to_string_lossy()).as_deref(), found)
}

fn parse_request(v: Option<&str>, found: Isa) -> Result<Option<Isa>, String> {
    let Some(v) = v else {
        return Ok(None);
    };
    let Some(&(level, _)) = Isa::NAMED.iter().find(|(_, n)| *n == v) else {
        let names: Vec<&str> = Isa::NAMED.iter().map(|(_, n)| *n).collect();
        return Err(format!(
            "{ISA_ENV}={v} names no kernel level: use one of {}",
            names.join(", ")
        ));
    };
    if level > found {
        return Err(format!(
            "{ISA_ENV}={v}: this CPU's best kernel level is {}",
            found.name()
        ));
    }
    Ok(Some(level))
}

/// Checks [`ISA_ENV`] (a program calls this at start, to fail with a clear message rather than
/// run at a level it was not asked for).
pub fn check_isa_env() -> Result<(), String> {
    requested(detect()).map(|_| ())
}

/// The name of the level the kernels run at (`avx512-vnni`, ...).
pub fn isa_name() -> &'static str {
    isa().name()
}

/// The level of this process: the machine's best (detected on first use), or the lower one
/// [`ISA_ENV`] asks for; fixed for the process. An unusable request is ignored here
/// ([`check_isa_env`] reports it). This crate's own unit tests run every level themselves
/// (`kernels_of`) and hold the others to the machine's best, so they ignore the request.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let found = detect();
        if cfg!(test) {
            return found;
        }
        requested(found).ok().flatten().unwrap_or(found)
    })
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
    (isa <= detect()).then(|| isa.table())
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
            assert_eq!(detect(), want);
        }
        assert!(std::ptr::eq(kernels(), isa().table()));
        assert_eq!(isa(), detect());
        assert!(Isa::ALL
            .iter()
            .all(|&l| kernels_of(l).is_some() == (l <= detect())));
    }

    #[test]
    fn the_level_asked_for_caps_the_machines() {
        let best = Isa::Avx512Vnni;
        assert_eq!(parse_request(None, best), Ok(None));
        for (level, name) in Isa::NAMED {
            assert_eq!(parse_request(Some(name), best), Ok(Some(level)));
            assert_eq!(level.name(), name);
        }
        assert_eq!(
            parse_request(Some("scalar"), Isa::Scalar),
            Ok(Some(Isa::Scalar))
        );
        let too_high = parse_request(Some("avx512"), Isa::Avx2).unwrap_err();
        assert_eq!(
            too_high,
            "SUPERNODE_ISA=avx512: this CPU's best kernel level is avx2"
        );
        let unknown = parse_request(Some("sse4"), best).unwrap_err();
        assert_eq!(
            unknown,
            "SUPERNODE_ISA=sse4 names no kernel level: use one of scalar, avx2, avx512, \
             avx512-vnni"
        );
    }
}
