//! The KDA op against fla / transformers reference outputs in `../shared/golden/golden_ops.safetensors`.

mod common;
use common::max_abs_diff;
use kl_kernels::kda::{kda_chunked, kda_gate, kda_recurrent, KdaShape};
use kl_kernels::norm::l2_normalize_rows;
use safetensors::SafeTensors;
use std::collections::HashMap;

fn load() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/golden/golden_ops.safetensors");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("golden file {} is required: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("golden_ops parses");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// Slice batch `b` of a `[B, ...]` tensor.
fn batch<'a>(m: &'a HashMap<String, (Vec<usize>, Vec<f32>)>, name: &str, b: usize) -> &'a [f32] {
    let (shape, v) = m
        .get(name)
        .unwrap_or_else(|| panic!("golden tensor {name} missing"));
    let per = v.len() / shape[0];
    &v[b * per..(b + 1) * per]
}

fn run(m: &HashMap<String, (Vec<usize>, Vec<f32>)>, prefix: &str, init: &str, chunked: bool) {
    let (qs, _) = &m[&format!("{prefix}.q")];
    let (t, h, k) = (qs[1], qs[2], qs[3]);
    let v = m[&format!("{prefix}.v")].0[3];
    let s = KdaShape::new(t, h, k, v);
    let a_log = &m["kda.A_log"].1;
    let dt_bias = &m["kda.dt_bias"].1;
    for b in 0..qs[0] {
        let mut q = batch(m, &format!("{prefix}.q"), b).to_vec();
        let mut kk = batch(m, &format!("{prefix}.k"), b).to_vec();
        l2_normalize_rows(&mut q, k, 1e-6, (k as f32).powf(-0.5));
        l2_normalize_rows(&mut kk, k, 1e-6, 1.0);
        let mut g = batch(m, &format!("{prefix}.gate_in"), b).to_vec();
        kda_gate(&mut g, a_log, dt_bias, h, k);
        let g_ref = batch(m, &format!("{prefix}.g"), b);
        assert!(max_abs_diff(&g, g_ref) < 1e-5, "{prefix} gate");
        let mut state = batch(m, init, b).to_vec();
        let mut o = vec![0.0; t * h * v];
        let (vv, beta) = (
            batch(m, &format!("{prefix}.v"), b),
            batch(m, &format!("{prefix}.beta"), b),
        );
        if chunked {
            kda_chunked(s, &q, &kk, vv, &g, beta, &mut state, &mut o);
        } else {
            kda_recurrent(s, &q, &kk, vv, &g, beta, &mut state, &mut o);
        }
        let od = max_abs_diff(&o, batch(m, &format!("{prefix}.o"), b));
        let sd = max_abs_diff(&state, batch(m, &format!("{prefix}.final_state"), b));
        assert!(
            od < 1e-5 && sd < 1e-5,
            "{prefix} chunked={chunked} batch {b}: o {od:e} state {sd:e}"
        );
    }
}

#[test]
fn kda_op_matches_golden_both_forms() {
    let m = load();
    run(&m, "kda", "kda.initial_state", true);
    run(&m, "kda", "kda.initial_state", false);
}

#[test]
fn kda_decode_step_matches_golden() {
    let m = load();
    run(&m, "kda_step", "kda.final_state", false);
    run(&m, "kda_step", "kda.final_state", true);
}
