//! Run-time CPU feature detection, done once and cached.

use std::sync::OnceLock;

/// The SIMD features the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA (x86-64).
    pub avx2_fma: bool,
    /// AVX-512F (x86-64).
    pub avx512f: bool,
}

/// Features of the running CPU (detected on first call). Setting the environment variable
/// `KL_NO_SIMD=1` forces the portable paths (used to test them on SIMD machines).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        let off = std::env::var("KL_NO_SIMD")
            .map(|v| v == "1")
            .unwrap_or(false);
        #[cfg(target_arch = "x86_64")]
        {
            if !off {
                return Features {
                    avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                    avx512f: is_x86_feature_detected!("avx512f"),
                };
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
