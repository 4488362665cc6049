//! Element types a weight matrix or a cache may be stored in.

use half::{bf16, f16};

/// A storage element: f32, bf16 or f16. Conversions to f32 are exact for all three.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widen one element.
    fn to_f32(self) -> f32;
    /// Narrow one f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Widen a row into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// `Σ src[i]·x[i]` accumulated in f32.
    fn dot(src: &[Self], x: &[f32]) -> f32 {
        src.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }
    /// `src` itself when `Self` is bf16 (what the tile kernels read directly), else `None`.
    fn as_bf16(src: &[Self]) -> Option<&[bf16]> {
        let _ = src;
        None
    }
    /// `src` itself when `Self` is f32 (what the attention kernels read in place), else `None`.
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        let _ = src;
        None
    }
}

impl Elem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn dot(src: &[Self], x: &[f32]) -> f32 {
        crate::simd::dot_f32(src, x)
    }
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl Elem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        crate::simd::widen_bf16(src, dst)
    }
    fn dot(src: &[Self], x: &[f32]) -> f32 {
        crate::simd::dot_bf16(src, x)
    }
    fn as_bf16(src: &[Self]) -> Option<&[bf16]> {
        Some(src)
    }
}

impl Elem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
