// temporary tuning driver (not part of the deliverable)
use half::bf16;
use std::sync::atomic::Ordering;
use std::time::Instant;
fn best(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}
fn cpu_ns() -> u64 {
    let mut tot = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            tot += s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    tot
}
fn kda_main() {
    use kl_kernels::kda::*;
    let (h, kd, vd, t) = (32usize, 128usize, 128usize, 1024usize);
    let s = KdaShape { t, h, k: kd, v: vd };
    let mut seed = 7u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut q: Vec<f32> = (0..t * h * kd).map(|_| rnd()).collect();
    let mut k: Vec<f32> = (0..t * h * kd).map(|_| rnd()).collect();
    kl_kernels::norm::l2_normalize_rows(&mut q, kd, 1e-6, (kd as f32).powf(-0.5));
    kl_kernels::norm::l2_normalize_rows(&mut k, kd, 1e-6, 1.0);
    let v: Vec<f32> = (0..t * h * vd).map(|_| rnd()).collect();
    let g: Vec<f32> = (0..t * h * kd)
        .map(|_| -((rnd() + 1.0) * 0.5).powi(4) * 3.0)
        .collect();
    let beta: Vec<f32> = (0..t * h).map(|_| (rnd() + 1.0) * 0.5).collect();
    let mut st = vec![0f32; h * kd * vd];
    let mut o = vec![0f32; t * h * vd];
    let (tf, d, c) = (t as f64, kd as f64, 64.0);
    let flops = h as f64 * (6.0 * tf * d * d + 3.0 * tf * c * d + tf * c * c);
    let th = rayon::current_num_threads();
    let mut bestg = 0f64;
    let mut peak = 0f64;
    for _ in 0..std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
    {
        peak = peak.max(kl_kernels::roofline::measure_fma_gflops(th));
        let sec = best(|| kda_chunked(s, &q, &k, &v, &g, &beta, &mut st, &mut o), 5);
        bestg = bestg.max(flops / sec / 1e9);
        let c0 = cpu_ns();
        for _ in 0..5 {
            kda_chunked(s, &q, &k, &v, &g, &beta, &mut st, &mut o);
        }
        let cpu = (cpu_ns() - c0) as f64 * 1e-9 / 5.0;
        println!(
            "  cpu-time per call {:.1} ms -> {:.1} GFLOP/s per busy core",
            cpu * 1e3,
            flops / cpu / 1e9
        );
    }
    println!(
        "kda_chunked best {bestg:.1} GFLOP/s, peak {peak:.1}: {:.1}%",
        100.0 * bestg / peak
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(|s| s.as_str()) == Some("kda") {
        return kda_main();
    }
    // variants: "panelKiB,kc,nc_max" separated by spaces
    let variants: Vec<[usize; 3]> = args
        .iter()
        .map(|a| {
            let v: Vec<usize> = a.split(',').map(|x| x.parse().unwrap()).collect();
            [v[0], v[1], v[2]]
        })
        .collect();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut seed = 1u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let t = 512;
    let shapes = [
        (2304usize, 4096usize),
        (2304, 1024),
        (1024, 2304),
        (2304, 512),
        (4096, 2304),
    ];
    let data: Vec<_> = shapes
        .iter()
        .map(|&(k, n)| {
            let x: Vec<f32> = (0..t * k).map(|_| rnd()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rnd())).collect();
            (k, n, x, w)
        })
        .collect();
    let mut res = vec![vec![0f64; shapes.len()]; variants.len()];
    let mut peak = 0f64;
    for _ in 0..rounds {
        peak = peak.max(kl_kernels::roofline::measure_fma_gflops(
            rayon::current_num_threads(),
        ));
        for (vi, v) in variants.iter().enumerate() {
            for (i, x) in v.iter().enumerate() {
                kl_kernels::matmul::TUNE[i].store(*x, Ordering::Relaxed);
            }
            for (si, (k, n, x, w)) in data.iter().enumerate() {
                let mut y = vec![0f32; t * n];
                let s = best(|| kl_kernels::matmul::matmul(x, w, &mut y, t, *k, *n), 3);
                res[vi][si] = res[vi][si].max(2.0 * (t * k * n) as f64 / s / 1e9);
            }
        }
    }
    println!("peak {peak:.1}");
    for (vi, v) in variants.iter().enumerate() {
        let r: Vec<String> = res[vi]
            .iter()
            .map(|g| format!("{g:6.1} ({:4.1}%)", 100.0 * g / peak))
            .collect();
        println!("{v:?}: {}", r.join(" "));
    }
}
