//! `kimi-linear synth`: loads, validates, is deterministic, and a forward pass on it is finite.

mod common;
use common::*;

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `forward` on the model in `dir` for the ids `ids` (a JSON array), with `extra` flags; its
/// output file's tensors (written under `root`).
fn forward(
    root: &std::path::Path,
    dir: &std::path::Path,
    ids: &str,
    extra: &[&str],
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<f64>)> {
    let ids = write_ids(root, ids);
    let out = root.join("out.safetensors");
    let mut args = vec![
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids,
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    read_output(&out)
}

#[test]
fn synth_is_deterministic_sharded_and_runs() {
    let root = temp_dir("synth");
    let (a, b, c) = (root.join("a"), root.join("b"), root.join("c"));
    for (d, seed) in [(&a, "3"), (&b, "3"), (&c, "4")] {
        let o = run(&[
            "synth",
            "--preset",
            "tiny",
            "--out",
            d.to_str().unwrap(),
            "--seed",
            seed,
            "--shard-bytes",
            "200000",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa, fb, "same seed must give identical bytes");
    assert_ne!(fa, fc, "different seeds must differ");
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "config.json",
        "model.safetensors.index.json",
        "tiktoken.model",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(
            names.contains(&needed),
            "synth wrote {names:?}, missing {needed}"
        );
    }
    // It loads, validates (forward refuses otherwise) and gives finite logits.
    let r = forward(
        &root,
        &a,
        "[256, 10, 20, 30, 40, 50, 60, 70]",
        &["--decode", "4"],
    );
    assert!(r["logits"]
        .2
        .iter()
        .chain(&r["greedy.step_logits"].2)
        .all(|v| v.is_finite()));
    assert!(r["logits"].2.iter().any(|v| *v != 0.0));
}

#[test]
fn synth_refuses_unknown_preset_and_bad_config() {
    let root = temp_dir("synthbad");
    let out = root.join("x");
    expect_error(
        &["synth", "--preset", "huge", "--out", out.to_str().unwrap()],
        &["huge", "tiny, mini, kimi-linear-48b-a3b"],
    );
    let cfg = root.join("config.json");
    std::fs::write(&cfg, "{\"vocab_size\": 10}").unwrap();
    expect_error(
        &[
            "synth",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["config.json", "hidden_size"],
    );
}

/// `--layers N` keeps the first N layers with their pattern (the tiny preset's MLA layer is its
/// fourth, so three layers are all KDA), and the result loads and runs; 0 or more than the
/// config has is refused by name.
#[test]
fn synth_layers_keeps_the_first_layers() {
    let root = temp_dir("synth-layers");
    let d = root.join("m");
    let o = run(&[
        "synth",
        "--preset",
        "tiny",
        "--layers",
        "3",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 3);
    assert_eq!(
        cfg["linear_attn_config"]["kda_layers"],
        serde_json::json!([1, 2, 3])
    );
    assert_eq!(
        cfg["linear_attn_config"]["full_attn_layers"],
        serde_json::json!([])
    );
    let r = forward(&root, &d, "[256, 10, 20, 30]", &[]);
    assert!(r["logits"].2.iter().all(|x| x.is_finite()));
    for bad in ["0", "5"] {
        let o = run(&[
            "synth",
            "--preset",
            "tiny",
            "--layers",
            bad,
            "--out",
            root.join("bad").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("--layers {bad}: expected 1..=4")),
            "{err}"
        );
    }
}
