//! `plan`, `--memory-budget`, `--max-context` and `--cache-dtype` from the command line.

mod common;
use common::*;

fn json(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("plan --json prints one JSON object")
}

#[test]
fn plan_real_config_at_one_million_tokens() {
    let v = json(&[
        "plan",
        "--preset",
        "kimi-linear-48b-a3b",
        "--context",
        "1M",
        "--json",
    ]);
    assert_eq!(v["context"], 1_048_576);
    // 256 experts, top 8: the chunk at which each expert sees about 64 rows.
    assert_eq!(v["prefill_chunk"], 2048);
    assert_eq!(v["mla_cache_bytes"], 8_455_716_864u64);
    assert_eq!(v["kda_state_bytes"], 41_943_040);
    for k in [
        "weights_bytes",
        "conv_state_bytes",
        "workspace_bytes",
        "total_bytes",
    ] {
        assert!(v[k].as_u64().is_some(), "{k}");
    }
    let sum: u64 = [
        "weights_bytes",
        "mla_cache_bytes",
        "kda_state_bytes",
        "conv_state_bytes",
        "kda_carry_bytes",
        "workspace_bytes",
    ]
    .iter()
    .map(|k| v[k].as_u64().unwrap())
    .sum();
    assert_eq!(v["total_bytes"].as_u64().unwrap(), sum);
    let t = run(&[
        "plan",
        "--preset",
        "kimi-linear-48b-a3b",
        "--context",
        "128K",
    ]);
    let text = String::from_utf8_lossy(&t.stdout);
    for needle in [
        "MLA latent cache",
        "KDA recurrent state",
        "MHA",
        "GQA",
        "total",
    ] {
        assert!(text.contains(needle), "{text}");
    }
    expect_error(
        &[
            "plan",
            "--preset",
            "kimi-linear-48b-a3b",
            "--context",
            "lots",
        ],
        &["lots"],
    );
}

#[test]
fn plan_prefill_chunk_flag_sets_the_workspace() {
    let at = |chunk: Option<&str>| {
        let mut args = vec![
            "plan",
            "--preset",
            "kimi-linear-48b-a3b",
            "--context",
            "128K",
            "--json",
        ];
        if let Some(c) = chunk {
            args.extend(["--prefill-chunk", c]);
        }
        json(&args)
    };
    let (auto, small) = (at(None), at(Some("512")));
    assert_eq!(small["prefill_chunk"], 512);
    assert_eq!(auto["workspace_bytes"], at(Some("2048"))["workspace_bytes"]);
    assert!(auto["workspace_bytes"].as_u64() > small["workspace_bytes"].as_u64());
    assert_eq!(
        json(&["plan", "--preset", "mini", "--context", "4K", "--json"])["prefill_chunk"],
        2048
    );
}

#[test]
fn budget_refusal_lists_parts_and_largest_context() {
    let tiny = tiny_dir();
    let t = tiny.to_str().unwrap();
    let v = json(&[
        "plan",
        "--model",
        t,
        "--context",
        "2000",
        "--cache-dtype",
        "f32",
        "--prefill-chunk",
        "512",
        "--json",
    ]);
    let (total, cache) = (
        v["total_bytes"].as_u64().unwrap(),
        v["mla_cache_bytes"].as_u64().unwrap(),
    );
    let d = temp_dir("budget");
    let ids = write_ids(&d, &serde_json::to_string(&vec![1; 2000]).unwrap());
    let out = d.join("o.safetensors");
    // `forward` keeps all logits of a 512-token chunk (vocab 512, f32) on top of the plan above;
    // give it that, but only half of the cache 2000 tokens need.
    let budget = format!("{}", total + 512 * 512 * 4 - cache / 2);
    let err = expect_error(
        &[
            "forward",
            "--model",
            t,
            "--input-ids",
            &ids,
            "--memory-budget",
            &budget,
            "--output",
            out.to_str().unwrap(),
        ],
        &[
            "memory budget",
            "weights",
            "MLA latent cache",
            "KDA recurrent state",
            "workspace",
            "total",
        ],
    );
    assert!(
        err.contains("largest context that fits is") || err.contains("not even an empty context"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "nothing is written when the plan does not fit"
    );
    expect_error(
        &[
            "forward",
            "--model",
            t,
            "--input-ids",
            &ids,
            "--memory-budget",
            "1KB",
            "--output",
            out.to_str().unwrap(),
        ],
        &["not even an empty context fits"],
    );
    expect_error(
        &[
            "forward",
            "--model",
            t,
            "--input-ids",
            &ids,
            "--max-context",
            "1K",
            "--output",
            out.to_str().unwrap(),
        ],
        &["2000", "--max-context is 1024"],
    );
    expect_error(
        &[
            "forward",
            "--model",
            t,
            "--input-ids",
            &ids,
            "--memory-budget",
            "12 parsecs",
            "--output",
            out.to_str().unwrap(),
        ],
        &["12 parsecs"],
    );
}

#[test]
fn cache_dtype_flag() {
    let d = temp_dir("cdt");
    let ids = write_ids(&d, "[1, 2, 3, 4, 5]");
    let tiny = tiny_dir();
    for dt in ["f32", "bf16", "fp8"] {
        let out = d.join(format!("{dt}.safetensors"));
        let o = run(&[
            "forward",
            "--model",
            tiny.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--cache-dtype",
            dt,
            "--max-context",
            "4K",
            "--decode",
            "2",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{dt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    expect_usage_error(
        &[
            "forward",
            "--model",
            tiny.to_str().unwrap(),
            "--input-ids",
            &ids,
            "--cache-dtype",
            "int3",
            "--output",
            "x",
        ],
        &["--cache-dtype", "int3", "bf16, f32, fp8"],
    );
}

#[test]
fn run_honours_memory_flags() {
    let d = temp_dir("runmem");
    let m = d.join("m");
    let o = run(&["synth", "--preset", "tiny", "--out", m.to_str().unwrap()]);
    assert!(o.status.success());
    let ms = m.to_str().unwrap();
    expect_error(
        &[
            "run",
            "--model",
            ms,
            "--prompt",
            "hello",
            "--memory-budget",
            "1KB",
        ],
        &["memory budget", "not even an empty context fits"],
    );
    // The budget-derived limit stops generation cleanly, reported in the stats line.
    let o = run(&[
        "run",
        "--model",
        ms,
        "--prompt",
        "hello world",
        "-n",
        "40",
        "--seed",
        "1",
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-context",
        "20",
        "--cache-dtype",
        "fp8",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("context: 20/20"), "{err}");
}

/// The numbers of the JSON array `a` (named `what`; `whole` is the document, for the message).
fn numbers(a: &serde_json::Value, what: &str, whole: &serde_json::Value) -> Vec<f64> {
    a.as_array()
        .unwrap_or_else(|| panic!("{what}: {whole}"))
        .iter()
        .map(|x| {
            x.as_f64()
                .unwrap_or_else(|| panic!("{what}: not a number: {whole}"))
        })
        .collect()
}

/// `bench` on the tiny model, two threads, two decoded tokens, prompts of `prompts` tokens, then
/// `extra`; it must succeed.
fn bench_tiny(prompts: &str, extra: &[&str]) -> std::process::Output {
    let tiny = tiny_dir();
    let mut args = vec![
        "--threads",
        "2",
        "bench",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt-tokens",
        prompts,
        "--gen-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn bench_quotes_the_higher_of_two_roofline_measurements() {
    let o = bench_tiny("5,17", &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for key in ["fma_gflops", "stream_gbps"] {
        let m = numbers(
            &v["roofline_measured"][key],
            &format!("roofline_measured.{key}"),
            &v,
        );
        assert_eq!(m.len(), 2, "{v}");
        assert!(m.iter().all(|x| *x > 0.0 && x.is_finite()), "{v}");
        assert_eq!(v[key].as_f64(), Some(m[0].max(m[1])), "{v}");
    }
    // The bf16 dot-product peak: measured twice where the bf16 attention products run on the
    // instruction, null (both times) elsewhere.
    let dot = &v["roofline_measured"]["bf16_dot_gflops"];
    if kl_kernels::cpu::features().avx512bf16 {
        let m = numbers(dot, "roofline_measured.bf16_dot_gflops", &v);
        assert!(
            m.len() == 2 && m.iter().all(|x| *x > 0.0 && x.is_finite()),
            "{v}"
        );
        assert_eq!(v["bf16_dot_gflops"].as_f64(), Some(m[0].max(m[1])), "{v}");
    } else {
        assert!(v["bf16_dot_gflops"].is_null(), "{v}");
        assert!(
            dot.as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_null())),
            "{v}"
        );
    }
    let f = v["prefill_fraction_of_fma_peak"]["17"]
        .as_f64()
        .expect("fraction");
    assert!(f > 0.0 && f.is_finite(), "{v}");
    // The products' own fraction: a finite figure where compute-bound products ran, null (not
    // NaN, not zero) for a prompt short enough to take only the matrix–vector path.
    let p = v["prefill_matmul_fraction_of_fma_peak"]["17"]
        .as_f64()
        .expect("products' fraction");
    assert!(p > 0.0 && p.is_finite(), "{v}");
    assert!(
        v["prefill_matmul_fraction_of_fma_peak"]["5"].is_null(),
        "{v}"
    );
    let d = v["decode_fraction_of_roofline"]["0"]
        .as_f64()
        .expect("fraction");
    assert!(d > 0.0 && d.is_finite(), "{v}");
}

/// A prompt of at most 8 tokens runs no compute-bound product: the text report says so instead
/// of quoting the products at `NaN%` of the peak.
#[test]
fn bench_text_names_a_prefill_without_matrix_products() {
    let o = bench_tiny("5", &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("prefill "))
        .unwrap_or_else(|| panic!("no prefill line: {out}"));
    assert!(line.contains("no compute-bound matrix products"), "{line}");
    assert!(!line.contains("NaN"), "{line}");
}

#[test]
fn bench_json_reports_every_field() {
    let tiny = tiny_dir();
    let t = tiny.to_str().unwrap();
    let v = json(&[
        "--threads",
        "2",
        "bench",
        "--model",
        t,
        "--prompt-tokens",
        "5,17",
        "--gen-tokens",
        "3",
        "--depth",
        "0,40",
        "--repeat",
        "3",
        "--no-roofline",
        "--json",
    ]);
    assert_eq!(v["threads"], 2);
    assert_eq!(v["repeat"], 3);
    // Every run is reported, sorted, and the headline figure is the median run.
    let median_of = |runs: &serde_json::Value, key: &str| {
        let r = numbers(&runs[key], key, &v);
        assert_eq!(r.len(), 3, "{v}");
        assert!(r.windows(2).all(|w| w[0] <= w[1]), "{v}");
        r[1]
    };
    for len in ["5", "17"] {
        let tps = v["prefill_tokens_per_s"][len].as_f64().expect(len);
        assert!(tps > 0.0 && tps.is_finite(), "{v}");
        let m = median_of(&v["prefill_tokens_per_s_runs"], len);
        assert!((tps - m).abs() <= 1e-9 * m, "{v}");
    }
    // The matrix-product tally: compute-bound products (more than 8 rows) ran for part of the
    // 17-token prefill and not at all in the 5-token one (those are matrix–vector products).
    let share = v["prefill_matmul_time_share"]["17"]
        .as_f64()
        .expect("share");
    assert!(share > 0.0 && share <= 1.0, "{v}");
    assert_eq!(
        v["prefill_matmul_time_share"]["5"].as_f64(),
        Some(0.0),
        "{v}"
    );
    for depth in ["0", "40"] {
        let tps = v["decode_tokens_per_s"][depth].as_f64().expect(depth);
        assert!(tps > 0.0 && tps.is_finite(), "{v}");
        assert_eq!(tps, median_of(&v["decode_tokens_per_s_runs"], depth), "{v}");
        // Which bound applies depends on the roofline: not reported without one.
        assert!(v["decode_bound"][depth].is_null(), "{v}");
        assert!(v["decode_fraction_of_roofline"][depth].is_null(), "{v}");
    }
    // Without a roofline measurement the roofline figures are null, never made up.
    assert!(
        v["fma_gflops"].is_null() && v["stream_gbps"].is_null() && v["bf16_dot_gflops"].is_null(),
        "{v}"
    );
    assert!(v["roofline_measured"].is_null(), "{v}");
    assert!(
        v["prefill_matmul_fraction_of_fma_peak"]["17"].is_null(),
        "{v}"
    );
    let rss = v["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss > 1 << 20, "{v}");
    // Closed sets of values are usage errors (exit 2) that name the flag and list the values.
    for (flag, bad, values) in [
        ("--depth-fill", "sideways", "prefill, random"),
        ("--cache-dtype", "f64", "bf16, f32, fp8"),
    ] {
        expect_usage_error(&["bench", "--model", t, flag, bad], &[flag, bad, values]);
    }
    expect_error(
        &["bench", "--model", t, "--repeat", "0"],
        &["--repeat", "0"],
    );
}

/// `--scaling`: every listed thread count (sorted, once each) gets the same runs, in a pool of
/// its own; the main pool's count reuses the main runs' figures; speed-ups are over the first.
#[test]
fn bench_scaling_measures_each_thread_count() {
    let o = bench_tiny(
        "5,17",
        &[
            "--depth",
            "0,9",
            "--scaling",
            "2,1,1",
            "--no-roofline",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let rows = v["scaling"].as_array().unwrap_or_else(|| panic!("{v}"));
    let threads: Vec<u64> = rows
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 2], "{v}");
    for (r, kind, keys) in [
        (0, "prefill", ["5", "17"]),
        (0, "decode", ["0", "9"]),
        (1, "prefill", ["5", "17"]),
        (1, "decode", ["0", "9"]),
    ] {
        let row = &rows[r];
        for k in keys {
            let tps = row[format!("{kind}_tokens_per_s")][k]
                .as_f64()
                .unwrap_or_else(|| panic!("{kind} {k}: {v}"));
            assert!(tps > 0.0 && tps.is_finite(), "{v}");
            let base = rows[0][format!("{kind}_tokens_per_s")][k].as_f64().unwrap();
            let up = row[format!("{kind}_speedup")][k].as_f64().unwrap();
            assert!((up - tps / base).abs() <= 1e-12 * up.abs(), "{v}");
            // Two threads are the main pool: its figures, not a second measurement.
            if r == 1 {
                assert_eq!(
                    row[format!("{kind}_tokens_per_s")][k],
                    v[format!("{kind}_tokens_per_s")][k],
                    "{v}"
                );
            }
        }
        // Without a roofline there are no peaks to quote, and no fractions of them.
        assert!(
            row["fma_gflops"].is_null() && row["stream_gbps"].is_null(),
            "{v}"
        );
        let fraction = match kind {
            "prefill" => "prefill_fraction_of_fma_peak",
            _ => "decode_fraction_of_roofline",
        };
        for k in keys {
            assert!(row[fraction][k].is_null(), "{v}");
        }
    }
    assert_eq!(rows[0]["prefill_speedup"]["17"].as_f64(), Some(1.0), "{v}");
    // Without the flag the list is empty.
    let o = bench_tiny("5", &["--no-roofline", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["scaling"], serde_json::json!([]), "{v}");
}

/// The text report's scaling table: a row per count, with its roofline and speed-ups.
#[test]
fn bench_scaling_table() {
    let o = bench_tiny("17", &["--scaling", "1,2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let at = out
        .find("scaling (tok/s, × over 1 thread, and % of the roofline")
        .unwrap_or_else(|| panic!("no scaling table: {out}"));
    let lines: Vec<&str> = out[at..].lines().collect();
    assert!(
        lines[1].contains("prefill 17") && lines[1].contains("decode @0"),
        "{out}"
    );
    for (line, n) in lines[2..4].iter().zip(["1", "2"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], n, "{out}");
        // FMA GFLOP/s and stream GB/s measured for every count.
        for c in &cells[1..3] {
            let x: f64 = c.parse().unwrap_or_else(|_| panic!("{c}: {out}"));
            assert!(x > 0.0, "{out}");
        }
        assert!(line.contains('×'), "{out}");
        // Each cell ends in its fraction of the roofline measured on its own threads.
        let pcts: Vec<f64> = cells
            .iter()
            .filter_map(|c| c.strip_suffix('%'))
            .map(|c| c.parse().unwrap_or_else(|_| panic!("{c}: {out}")))
            .collect();
        assert_eq!(pcts.len(), 2, "{out}");
        assert!(pcts.iter().all(|&p| p > 0.0), "{out}");
    }
    expect_error(
        &[
            "bench",
            "--model",
            tiny_dir().to_str().unwrap(),
            "--scaling",
            "1,0",
        ],
        &["--scaling 0", "at least 1"],
    );
}
