//! Writer → loader round trips, single file and sharded, and the writer's own checks.
mod common;

use std::collections::BTreeMap;
use std::io;

use common::TempDir;
use kl_config::{presets, ModelConfig};
use kl_weights::{
    expected_tensors, write_checkpoint, Checkpoint, Dtype, Sink, TensorSpec, WeightsError,
};

/// A deterministic byte pattern for a tensor, emitted in pieces of at most 1000 bytes.
fn pattern(spec: &TensorSpec) -> Vec<u8> {
    let salt = spec.name.len() as u8;
    (0..spec.nbytes() as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn fill(spec: &TensorSpec, sink: &mut Sink<'_>) -> io::Result<()> {
    for piece in pattern(spec).chunks(1000) {
        sink(piece)?;
    }
    Ok(())
}

fn tiny_specs() -> (ModelConfig, Vec<TensorSpec>) {
    let cfg = ModelConfig::from_raw(presets::tiny()).unwrap();
    let specs = expected_tensors(&cfg);
    (cfg, specs)
}

fn check(ck: &Checkpoint, cfg: &ModelConfig, specs: &[TensorSpec]) {
    ck.validate(cfg).unwrap();
    for s in specs {
        let t = ck.get(&s.name).unwrap();
        assert_eq!(t.dtype(), s.dtype);
        assert_eq!(t.shape(), &s.shape[..]);
        assert!(t.is_zero_copy(), "{} should be aligned", s.name);
        assert_eq!(t.bytes(), &pattern(s)[..], "{}", s.name);
    }
    assert_eq!(
        ck.total_bytes(),
        specs.iter().map(TensorSpec::nbytes).sum::<u64>()
    );
}

#[test]
fn single_file_round_trip() {
    let (cfg, specs) = tiny_specs();
    let d = TempDir::new("rt-single");
    let files = write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    assert_eq!(files, vec![d.path().join("model.safetensors")]);
    let ck = Checkpoint::open(d.path()).unwrap();
    check(&ck, &cfg, &specs);
    // Header metadata is {"format": "pt"}.
    let bytes = std::fs::read(&files[0]).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"], serde_json::json!({"format": "pt"}));
}

#[test]
fn sharded_round_trip_is_deterministic() {
    let (cfg, specs) = tiny_specs();
    let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
    let d = TempDir::new("rt-sharded");
    let md = BTreeMap::from([("origin".to_string(), "test".to_string())]);
    let files = write_checkpoint(d.path(), &specs, 200_000, Some(md.clone()), fill).unwrap();
    let n = files.len() - 1;
    assert!(n > 3, "expected several shards, got {n}");
    assert_eq!(
        files[0].file_name().unwrap(),
        format!("model-00001-of-{n:05}.safetensors").as_str()
    );
    assert_eq!(files[n], d.path().join("model.safetensors.index.json"));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[n]).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), specs.len());

    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.files().len(), n);
    check(&ck, &cfg, &specs);

    // Same input, same bytes.
    let d2 = TempDir::new("rt-sharded2");
    let files2 = write_checkpoint(d2.path(), &specs, 200_000, Some(md), fill).unwrap();
    assert_eq!(files.len(), files2.len());
    for (a, b) in files.iter().zip(&files2) {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{}",
            a.display()
        );
    }

    // Writing a single file over it removes the stale index.
    write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    assert!(!d.path().join("model.safetensors.index.json").exists());
    check(&Checkpoint::open(d.path()).unwrap(), &cfg, &specs);
}

#[test]
fn fill_must_emit_exactly_the_declared_bytes() {
    let specs = vec![TensorSpec {
        name: "w".into(),
        shape: vec![4],
        dtype: Dtype::F32,
    }];
    let d = TempDir::new("rt-fill");
    let short = write_checkpoint(d.path(), &specs, u64::MAX, None, |_, sink| sink(&[0; 12]));
    let e = short.unwrap_err().to_string();
    assert!(
        e.contains("`w`")
            && e.contains("12 bytes")
            && e.contains("16")
            && e.contains("model.safetensors"),
        "{e}"
    );
    let long = write_checkpoint(
        d.path(),
        &specs,
        u64::MAX,
        None,
        |_s: &TensorSpec, sink: &mut Sink<'_>| sink(&[0; 20]),
    );
    let e = long.unwrap_err().to_string();
    assert!(
        e.contains("`w`") && e.contains("more than the 16 bytes"),
        "{e}"
    );
    assert!(
        !d.path().join("model.safetensors").exists(),
        "a failed write leaves no file"
    );
    let failing = write_checkpoint(
        d.path(),
        &specs,
        u64::MAX,
        None,
        |_s: &TensorSpec, _sink: &mut Sink<'_>| Err(io::Error::other("generator broke")),
    );
    assert!(failing.unwrap_err().to_string().contains("generator broke"));

    let dup = vec![specs[0].clone(), specs[0].clone()];
    let err = write_checkpoint(d.path(), &dup, u64::MAX, None, fill).unwrap_err();
    assert!(
        matches!(err, WeightsError::Write { .. }) && err.to_string().contains("`w`"),
        "{err}"
    );
}

#[test]
fn validate_lists_every_problem() {
    let (cfg, mut specs) = tiny_specs();
    let removed = [specs.remove(5).name, specs.remove(40).name];
    let reshaped = specs[10].name.clone();
    specs[10].shape = vec![7, 3];
    specs.push(TensorSpec {
        name: "model.extra.weight".into(),
        shape: vec![2, 2],
        dtype: Dtype::F16,
    });
    let d = TempDir::new("rt-validate");
    write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let err = ck.validate(&cfg).unwrap_err();
    let WeightsError::Validation { problems, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(problems.len(), 4, "{problems:?}");
    let e = err.to_string();
    for name in removed.iter().chain([&reshaped]) {
        assert!(e.contains(name.as_str()), "{name} not in {e}");
    }
    assert!(
        e.contains("[7, 3]") && e.contains("model.extra.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    assert!(e.contains("2 missing, 1 unexpected, 1 wrong-shaped"), "{e}");
    let f16 = ck.get("model.extra.weight").unwrap();
    assert_eq!(f16.as_f16().unwrap().len(), 4);
}

#[test]
fn tied_embeddings_accept_an_lm_head() {
    let mut raw = presets::tiny();
    raw.tie_word_embeddings = true;
    let cfg = ModelConfig::from_raw(raw).unwrap();
    let mut specs = expected_tensors(&cfg);
    let d = TempDir::new("rt-tied");
    write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    Checkpoint::open(d.path()).unwrap().validate(&cfg).unwrap();
    specs.push(TensorSpec::new("lm_head.weight", vec![512, 128]));
    write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    Checkpoint::open(d.path()).unwrap().validate(&cfg).unwrap();
    specs.last_mut().unwrap().shape = vec![512, 64];
    write_checkpoint(d.path(), &specs, u64::MAX, None, fill).unwrap();
    let e = Checkpoint::open(d.path())
        .unwrap()
        .validate(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lm_head.weight") && e.contains("[512, 128]"),
        "{e}"
    );
}
