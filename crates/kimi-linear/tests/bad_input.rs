//! Bad input: each case must fail with exit code 1, no panic, and a message naming the culprit.

mod common;
use common::*;
use serde_json::json;

fn fwd(model: &std::path::Path, ids: &str) -> Vec<String> {
    let out = model.join("out.safetensors");
    vec![
        "forward".into(),
        "--model".into(),
        model.display().to_string(),
        "--input-ids".into(),
        ids.into(),
        "--output".into(),
        out.display().to_string(),
    ]
}

fn check(model: &std::path::Path, needles: &[&str]) {
    let ids = write_ids(model, "[1, 2, 3]");
    let args = fwd(model, &ids);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    expect_error(&a, needles);
}

#[test]
fn truncated_safetensors() {
    let d = tiny_copy("trunc");
    let p = d.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    check(&d, &["model.safetensors"]);
}

#[test]
fn file_shorter_than_header_length_field() {
    let d = tiny_copy("short");
    std::fs::write(d.join("model.safetensors"), [1u8, 2, 3]).unwrap();
    check(&d, &["model.safetensors"]);
}

#[test]
fn header_length_larger_than_file() {
    let d = tiny_copy("hlen");
    let p = d.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, b).unwrap();
    check(&d, &["model.safetensors"]);
}

#[test]
fn offsets_past_end_of_file() {
    let d = tiny_copy("offs");
    let p = d.join("model.safetensors");
    let (mut h, data) = read_st(&p);
    let total = data.len() as u64;
    // Move the last tensor's range past the end.
    let (name, _) = h
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let e = h.get_mut(&name).unwrap();
    let start = e["data_offsets"][0].as_u64().unwrap();
    let len = e["data_offsets"][1].as_u64().unwrap() - start;
    e["data_offsets"] = json!([total + 64, total + 64 + len]);
    write_st(&p, &h, &data);
    check(&d, &["model.safetensors"]);
}

#[test]
fn dtype_size_disagrees_with_bytes() {
    let d = tiny_copy("dtype");
    let p = d.join("model.safetensors");
    let (mut h, data) = read_st(&p);
    h.get_mut("model.norm.weight").unwrap()["dtype"] = json!("F32");
    write_st(&p, &h, &data);
    check(&d, &["model.norm.weight"]);
}

#[test]
fn missing_tensor_and_wrong_shape_listed_together() {
    let d = tiny_copy("missing");
    let p = d.join("model.safetensors");
    let (mut h, data) = read_st(&p);
    let v = h.remove("model.norm.weight").unwrap();
    h.insert("model.norm.weigth".into(), v);
    h.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap()["shape"] = json!([128, 96]);
    write_st(&p, &h, &data);
    check(
        &d,
        &[
            "model.norm.weight",
            "model.norm.weigth",
            "model.layers.0.self_attn.q_proj.weight",
            "[96, 128]",
        ],
    );
}

fn edit_config(d: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn config_missing_required_field() {
    let d = tiny_copy("cfgfield");
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("kv_lora_rank");
    });
    check(&d, &["config.json", "kv_lora_rank"]);
}

#[test]
fn config_layer_index_out_of_range() {
    let d = tiny_copy("cfgidx");
    edit_config(&d, |v| {
        v["linear_attn_config"]["kda_layers"] = json!([1, 2, 9])
    });
    check(&d, &["linear_attn_config.kda_layers", "1..=4"]);
}

#[test]
fn config_not_json() {
    let d = tiny_copy("cfgjson");
    std::fs::write(d.join("config.json"), "vocab_size = 512").unwrap();
    check(&d, &["config.json"]);
}

#[test]
fn token_ids_out_of_range_or_malformed() {
    let d = tiny_copy("ids");
    for (ids, needles) in [
        ("[1, -5, 3]", vec!["-5", "position 1"]),
        ("[1, 512]", vec!["512", "0..512"]),
        ("[]", vec!["empty"]),
        ("[1, 2", vec!["not JSON"]),
        ("{\"ids\": [1]}", vec!["array"]),
        ("[1, \"a\"]", vec!["element 1"]),
    ] {
        let p = write_ids(&d, ids);
        let args = fwd(&d, &p);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut n = vec!["ids.json"];
        n.extend(needles);
        expect_error(&a, &n);
    }
}

#[test]
fn model_path_does_not_exist() {
    let d = temp_dir("nomodel");
    let ids = write_ids(&d, "[1]");
    let missing = d.join("no-such-model");
    let args = fwd(&missing, &ids);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    expect_error(&a, &["no-such-model", "does not exist"]);
}
