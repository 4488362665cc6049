//! The whole model against HF transformers on the golden tiny checkpoint
//! (`../shared/golden/golden_model.safetensors`; see its README).

mod common;
use common::*;
use kl_model::{
    CacheDtype, KimiLinear, LayerState, LogitsMode, ModelOptions, Probe, RouterWeights,
    SequenceState,
};

const TOL: f32 = 1e-4;
const OP_TOL: f32 = 1e-5;

fn tiny_kda_dims() -> kl_config::KdaDims {
    kl_config::ModelConfig::from_file(&tiny_dir().join("config.json"))
        .unwrap()
        .kda
}

fn prompt(g: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<u32> {
    g["input_ids"].1.iter().map(|&x| x as u32).collect()
}

fn model(opts: ModelOptions) -> KimiLinear {
    KimiLinear::load(&tiny_dir(), opts).expect("tiny model loads")
}

/// Compare our state with golden caches under `prefix` (e.g. `layers.` or `greedy.final.layers.`).
fn check_caches(
    g: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    st: &SequenceState,
    prefix: &str,
) {
    for (i, ls) in st.layers.iter().enumerate() {
        match ls {
            LayerState::Kda(s) => {
                let (shape, conv) = &g[&format!("{prefix}{i}.cache.conv_state")];
                let (c3, w) = (shape[0], shape[1]);
                let p = c3 / 3;
                // Golden holds the last W inputs per channel [3P, W]; we keep the last W-1, [3][W-1, P].
                for (m, hist) in s.conv.iter().enumerate() {
                    for r in 0..w - 1 {
                        for ch in 0..p {
                            let want = conv[(m * p + ch) * w + (r + 1)];
                            let got = hist[r * p + ch];
                            assert!(
                                (got - want).abs() <= TOL,
                                "{prefix}{i} conv_state m={m} r={r} ch={ch}: {got} vs {want}"
                            );
                        }
                    }
                }
                assert_close(
                    &format!("{prefix}{i}.cache.recurrent_state"),
                    &s.current_recurrent(&tiny_kda_dims()),
                    &g[&format!("{prefix}{i}.cache.recurrent_state")].1,
                    TOL,
                );
            }
            LayerState::Mla(c) => {
                let (shape, lat) = &g[&format!("{prefix}{i}.cache.kv_latent")];
                let (_, rope) = &g[&format!("{prefix}{i}.cache.k_rope")];
                let (t, r) = (shape[0], shape[1]);
                assert_eq!(c.len(), t, "{prefix}{i} cache length");
                let dr = c.width() - r;
                let (mut gl, mut gr) = (Vec::new(), Vec::new());
                for j in 0..t {
                    let row = c.row(j);
                    gl.extend_from_slice(&row[..r]);
                    gr.extend_from_slice(&row[r..]);
                }
                assert_eq!(gr.len(), t * dr);
                assert_close(&format!("{prefix}{i}.cache.kv_latent"), &gl, lat, TOL);
                assert_close(&format!("{prefix}{i}.cache.k_rope"), &gr, rope, TOL);
            }
        }
    }
}

#[test]
fn prefill_matches_every_golden_tensor() {
    let g = load_golden("golden_model.safetensors");
    let m = model(ModelOptions {
        cache_dtype: CacheDtype::F32,
        ..Default::default()
    });
    let ids = prompt(&g);
    let mut st = m.new_state();
    let mut probe = Probe::on();
    let logits = m
        .prefill(&ids, &mut st, LogitsMode::All, &mut probe)
        .unwrap();
    let rec = probe.take();
    assert_close("logits", &logits, &g["logits"].1, TOL);
    let mut compared = 0;
    for (name, (shape, want)) in &g {
        let Some((gshape, got)) = rec.get(name) else {
            continue;
        };
        let tol = if name.contains(".kda.") || name.contains(".mla.") {
            OP_TOL
        } else {
            TOL
        };
        assert_eq!(
            gshape.iter().product::<usize>(),
            shape.iter().product::<usize>(),
            "{name} size"
        );
        if name.ends_with("moe.topk_ids") {
            assert_eq!(got, want, "{name}");
        } else {
            assert_close(name, got, want, tol);
        }
        compared += 1;
    }
    // Everything the engine has an equivalent for must have been compared.
    let expected: Vec<&String> = g
        .keys()
        .filter(|k| {
            !k.starts_with("greedy.")
                && !k.starts_with("variant.")
                && !k.contains(".cache.")
                && *k != "input_ids"
                && *k != "logits"
        })
        .collect();
    let missing: Vec<&&String> = expected
        .iter()
        .filter(|k| !rec.contains_key(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "golden tensors with no engine probe: {missing:?}"
    );
    assert!(compared >= 40, "compared only {compared}");
    check_caches(&g, &st, "layers.");
}

#[test]
fn greedy_decode_matches_golden() {
    let g = load_golden("golden_model.safetensors");
    let m = model(ModelOptions {
        cache_dtype: CacheDtype::F32,
        ..Default::default()
    });
    let ids = prompt(&g);
    let mut st = m.new_state();
    let last = m
        .prefill(&ids, &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    let want_ids: Vec<u32> = g["greedy.generated_ids"]
        .1
        .iter()
        .map(|&x| x as u32)
        .collect();
    let (vshape, want_steps) = &g["greedy.step_logits"];
    let v = vshape[1];
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32
    };
    let mut next = argmax(&last);
    let mut got_ids = Vec::new();
    for step in 0..want_ids.len() {
        got_ids.push(next);
        let l = m.decode(next, &mut st, &mut Probe::off()).unwrap();
        assert_close(
            &format!("greedy.step_logits[{step}]"),
            &l,
            &want_steps[step * v..(step + 1) * v],
            TOL,
        );
        next = argmax(&l);
    }
    assert_eq!(got_ids, want_ids);
    check_caches(&g, &st, "greedy.final.layers.");
}

#[test]
fn biased_router_variant_matches_golden() {
    let g = load_golden("golden_model.safetensors");
    let m = model(ModelOptions {
        router_weights: RouterWeights::Biased,
        cache_dtype: CacheDtype::F32,
        ..Default::default()
    });
    let mut st = m.new_state();
    let logits = m
        .prefill(&prompt(&g), &mut st, LogitsMode::All, &mut Probe::off())
        .unwrap();
    assert_close(
        "variant.router_weights_biased.logits",
        &logits,
        &g["variant.router_weights_biased.logits"].1,
        TOL,
    );
}

#[test]
fn chunked_prefill_any_chunk_size_matches_golden() {
    let g = load_golden("golden_model.safetensors");
    for chunk in [1usize, 7, 64, 99] {
        let m = model(ModelOptions {
            prefill_chunk: chunk,
            cache_dtype: CacheDtype::F32,
            ..Default::default()
        });
        let mut st = m.new_state();
        let logits = m
            .prefill(&prompt(&g), &mut st, LogitsMode::All, &mut Probe::off())
            .unwrap();
        assert_close(
            &format!("logits (prefill_chunk {chunk})"),
            &logits,
            &g["logits"].1,
            TOL,
        );
    }
}
