//! Run-time CPU feature detection, done once and cached.
//!
//! Two environment variables narrow what is used (read once, at the first call):
//! - `KL_NO_SIMD=1` forces the portable paths (to test them on SIMD machines);
//! - `KL_NO_AVX512=1` forces the AVX2 paths where AVX-512 kernels exist (they give the same bits,
//!   so this only changes speed; used to compare the two).

use std::sync::OnceLock;

/// The SIMD features the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA (x86-64).
    pub avx2_fma: bool,
    /// AVX-512F (x86-64); only set together with `avx2_fma`.
    pub avx512f: bool,
}

/// The instruction sets the kernels are written for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (any target).
    Portable,
    /// x86-64 AVX2 + FMA: 8-lane (256-bit) vectors.
    Avx2,
    /// x86-64 AVX-512F (with AVX2 + FMA): 16-lane (512-bit) vectors.
    Avx512,
}

impl Isa {
    /// Short lower-case name: `"portable"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Lanes of one f32 vector register (8 for the portable code, whose canonical order has 8
    /// lanes too).
    pub fn f32_lanes(self) -> usize {
        match self {
            Isa::Portable | Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Features {
    /// The widest instruction set these features allow.
    pub fn isa(self) -> Isa {
        if self.avx2_fma && self.avx512f {
            Isa::Avx512
        } else if self.avx2_fma {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }
}

/// Whether environment variable `name` is set to `1`.
fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| v == "1").unwrap_or(false)
}

/// Features of the running CPU (detected on first call), narrowed by `KL_NO_SIMD=1` (none) and
/// `KL_NO_AVX512=1` (no AVX-512).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        let off = env_flag("KL_NO_SIMD");
        #[cfg(target_arch = "x86_64")]
        {
            if !off {
                let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                let avx512f =
                    avx2_fma && is_x86_feature_detected!("avx512f") && !env_flag("KL_NO_AVX512");
                return Features { avx2_fma, avx512f };
            }
        }
        let _ = off;
        Features {
            avx2_fma: false,
            avx512f: false,
        }
    })
}

/// A one-line description, e.g. for `bench` output.
pub fn describe() -> String {
    let f = features();
    let mut s = vec![std::env::consts::ARCH.to_string()];
    if f.avx2_fma {
        s.push("avx2+fma".into());
    }
    if f.avx512f {
        s.push("avx512f".into());
    }
    if s.len() == 1 {
        s.push("portable".into());
    }
    s.join(" ")
}
