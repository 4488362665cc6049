fn main() {
    for t in [1usize, 2] {
        println!("threads {t}: fma {:.1}", kl_kernels::roofline::measure_fma_gflops(t));
        for mb in [64usize, 256, 512, 1024, 2048] {
            println!("  stream {mb} MiB: {:.1} GB/s", kl_kernels::roofline::measure_stream_gbps_bytes(t, mb << 20));
        }
    }
}
