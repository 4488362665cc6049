//! Malformed checkpoints built by hand: every error is clear, names the file (and the tensor
//! where one is involved), and nothing panics.
mod common;

use common::{put, raw_file, TempDir};
use kl_weights::{Checkpoint, WeightsError};

fn open_err(dir: &std::path::Path) -> String {
    Checkpoint::open(dir).unwrap_err().to_string()
}

#[test]
fn truncated_file() {
    let d = TempDir::new("trunc");
    let p = put(d.path(), "model.safetensors", &[1, 2, 3, 4, 5]);
    let e = open_err(d.path());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("5 bytes") && e.contains("8-byte"),
        "{e}"
    );
}

#[test]
fn header_length_past_end_of_file() {
    let d = TempDir::new("hdrlen");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    let p = put(d.path(), "model.safetensors", &bytes);
    let e = open_err(d.path());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("1000") && e.contains("only 8 bytes"),
        "{e}"
    );
}

#[test]
fn header_not_json() {
    let d = TempDir::new("notjson");
    let p = put(d.path(), "model.safetensors", &raw_file("{not json", &[]));
    let e = open_err(d.path());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("not a JSON object"),
        "{e}"
    );
}

#[test]
fn offsets_past_end() {
    let d = TempDir::new("offsets");
    let h = r#"{"blk.w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let p = put(d.path(), "model.safetensors", &raw_file(h, &[0; 8]));
    let e = open_err(d.path());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("`blk.w`") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn dtype_size_mismatch() {
    let d = TempDir::new("size");
    let h = r#"{"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}}"#;
    let p = put(d.path(), "model.safetensors", &raw_file(h, &[0; 16]));
    let e = open_err(d.path());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("`w`") && e.contains("needs 8 bytes"),
        "{e}"
    );
}

#[test]
fn unsupported_dtypes() {
    for (dtype, n) in [("I8", 4), ("F64", 32), ("F8_E4M3", 4), ("NOT_A_DTYPE", 4)] {
        let d = TempDir::new("dtype");
        let h =
            format!(r#"{{"q.weight":{{"dtype":"{dtype}","shape":[4],"data_offsets":[0,{n}]}}}}"#);
        let p = put(d.path(), "model.safetensors", &raw_file(&h, &vec![0; n]));
        let err = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(err, WeightsError::UnsupportedDtype { .. }),
            "{err:?}"
        );
        let e = err.to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("`q.weight`") && e.contains(dtype),
            "{e}"
        );
        assert!(e.contains("supported: BF16, F16, F32"), "{e}");
    }
}

#[test]
fn malformed_entry_gap_and_trailing_bytes() {
    let cases = [
        (
            r#"{"w":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}"#,
            4,
            "`w`",
        ),
        // A gap between tensors: offsets not contiguous.
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
            "safetensors parser",
        ),
        // Bytes after the last tensor.
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8,
            "safetensors parser",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
            8,
            "end before they start",
        ),
    ];
    for (h, n, want) in cases {
        let d = TempDir::new("malformed");
        let p = put(d.path(), "model.safetensors", &raw_file(h, &vec![0; n]));
        let e = open_err(d.path());
        assert!(
            e.contains(&p.display().to_string()) && e.contains(want),
            "{h}: {e}"
        );
    }
}

#[test]
fn misaligned_tensor_is_copied_in_its_own_dtype() {
    let d = TempDir::new("misaligned");
    // 64-byte header keeps the data section 8-aligned; `b` then starts at data offset 2.
    let mut h = r#"{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}"#.to_string();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(' ');
    }
    let mut data = half::bf16::from_f32(1.5).to_bits().to_le_bytes().to_vec();
    data.extend_from_slice(&3.25f32.to_le_bytes());
    data.extend_from_slice(&(-2.0f32).to_le_bytes());
    put(d.path(), "model.safetensors", &raw_file(&h, &data));
    let ck = Checkpoint::open(d.path()).unwrap();
    let a = ck.get("a").unwrap();
    assert!(a.is_zero_copy());
    assert_eq!(a.as_bf16().unwrap()[0].to_f32(), 1.5);
    let b = ck.get("b").unwrap();
    assert!(!b.is_zero_copy(), "misaligned F32 must be copied");
    assert_eq!(b.as_f32().unwrap(), &[3.25, -2.0]);
    assert_eq!(b.bytes(), &data[2..10]);
    assert_eq!(b.to_f32_vec(), vec![3.25, -2.0]);
    assert!(b.as_bf16().is_none() && b.as_f16().is_none());
}

#[test]
fn index_problems() {
    let one = |name: &str| {
        raw_file(
            &format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#),
            &[0; 4],
        )
    };

    // Index naming a shard that does not exist.
    let d = TempDir::new("missing-shard");
    put(d.path(), "model-00001-of-00002.safetensors", &one("x"));
    let idx = put(
        d.path(),
        "model.safetensors.index.json",
        br#"{"metadata":{"total_size":8},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
    );
    let err = Checkpoint::open(d.path()).unwrap_err();
    assert!(matches!(err, WeightsError::MissingShard { .. }), "{err:?}");
    let e = err.to_string();
    assert!(
        e.contains(&idx.display().to_string())
            && e.contains("model-00002-of-00002.safetensors")
            && e.contains("`y`"),
        "{e}"
    );

    // The same tensor in two shards.
    let d = TempDir::new("dup");
    let s1 = put(d.path(), "a.safetensors", &one("x"));
    let s2 = put(d.path(), "b.safetensors", &one("x"));
    put(
        d.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
    );
    let e = open_err(d.path());
    assert!(
        e.contains("`x`")
            && e.contains(&s1.display().to_string())
            && e.contains(&s2.display().to_string()),
        "{e}"
    );

    // A weight_map entry its shard does not hold.
    let d = TempDir::new("absent");
    put(d.path(), "a.safetensors", &one("x"));
    let idx = put(
        d.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"x":"a.safetensors","z":"a.safetensors"}}"#,
    );
    let e = open_err(d.path());
    assert!(
        e.contains(&idx.display().to_string()) && e.contains("`z`") && e.contains("a.safetensors"),
        "{e}"
    );

    // Not JSON, no weight_map, a path instead of a file name.
    for (text, want) in [
        (&b"{oops"[..], "not JSON"),
        (&br#"{"metadata":{}}"#[..], "weight_map"),
        (
            &br#"{"weight_map":{"x":"../a.safetensors"}}"#[..],
            "not a plain file name",
        ),
    ] {
        let d = TempDir::new("badindex");
        put(d.path(), "a.safetensors", &one("x"));
        let idx = put(d.path(), "model.safetensors.index.json", text);
        let e = open_err(d.path());
        assert!(
            e.contains(&idx.display().to_string()) && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn directory_problems() {
    let d = TempDir::new("dirs");
    let missing = d.path().join("nope");
    let e = open_err(&missing);
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("does not exist"),
        "{e}"
    );

    let e = open_err(d.path());
    assert!(
        e.contains(&d.path().display().to_string()) && e.contains("no model.safetensors"),
        "{e}"
    );

    let one = raw_file(
        r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    put(d.path(), "first.safetensors", &one);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), ["x"]);
    let e = ck.get("y").unwrap_err().to_string();
    assert!(
        e.contains("`y`") && e.contains(&d.path().display().to_string()),
        "{e}"
    );
    let e = ck.get_shaped("x", &[2]).unwrap_err().to_string();
    assert!(
        e.contains("`x`") && e.contains("[2]") && e.contains("first.safetensors"),
        "{e}"
    );

    put(d.path(), "second.safetensors", &one);
    let e = open_err(d.path());
    assert!(
        e.contains("first.safetensors") && e.contains("second.safetensors"),
        "{e}"
    );

    // A path straight to a file works.
    let ck = Checkpoint::open(&d.path().join("second.safetensors")).unwrap();
    assert_eq!(ck.len(), 1);
}
