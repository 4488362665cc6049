fn main() {
    for _ in 0..6 {
        let a = kl_kernels::roofline::measure_fma_gflops(1);
        let b = kl_kernels::roofline::measure_fma_gflops(2);
        println!("fma 1t {a:.1}  2t {b:.1}");
    }
}
