//! Property tests on synthetic checkpoints with non-default shapes: head dims that are not powers
//! of two, low-rank q, several dense layers, several shared experts, group-limited routing, tied
//! embeddings, MLA in the middle and at the end.

mod common;
use common::*;
use kl_config::{presets, ModelConfig, RawConfig};
use kl_layers::cache::{CacheDtype, LatentCache};
use kl_layers::mla::Mla;
use kl_layers::{Probe as LProbe, Scratch};
use kl_model::{KimiLinear, LayerState, LogitsMode, MlaPrefill, ModelOptions, Probe};
use std::path::PathBuf;
use std::sync::OnceLock;

fn odd_config() -> RawConfig {
    let mut c = presets::tiny();
    c.vocab_size = 600;
    c.hidden_size = 72;
    c.intermediate_size = 100;
    c.num_hidden_layers = 6;
    c.linear_attn_config.kda_layers = vec![1, 3, 4, 5];
    c.linear_attn_config.full_attn_layers = vec![2, 6];
    c.linear_attn_config.num_heads = 3;
    c.linear_attn_config.head_dim = 20;
    c.linear_attn_config.short_conv_kernel_size = 3;
    c.num_attention_heads = 3;
    c.num_key_value_heads = Some(3);
    c.q_lora_rank = Some(40);
    c.kv_lora_rank = 30;
    c.qk_nope_head_dim = 12;
    c.qk_rope_head_dim = 6;
    c.v_head_dim = 10;
    c.num_experts = Some(6);
    c.num_experts_per_token = Some(3);
    c.moe_intermediate_size = Some(18);
    c.num_shared_experts = 2;
    c.first_k_dense_replace = 2;
    c.num_expert_group = 3;
    c.topk_group = 2;
    c.tie_word_embeddings = true;
    c
}

/// The odd synthetic model, written once per test binary (under the build dir, see
/// `build_dir_fixture`).
fn odd_model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_dir_fixture("kl-model-props", |d| {
            kl_weights::synth_checkpoint(&odd_config(), d, 7, 1 << 16).expect("synth");
        })
    })
}

fn load(chunk: usize) -> KimiLinear {
    load_form(chunk, MlaPrefill::Auto)
}

fn load_form(chunk: usize, mla_prefill: MlaPrefill) -> KimiLinear {
    KimiLinear::load(
        odd_model_dir(),
        ModelOptions {
            prefill_chunk: chunk,
            cache_dtype: CacheDtype::F32,
            mla_prefill,
            ..Default::default()
        },
    )
    .expect("loads")
}

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng(seed | 1);
    (0..n).map(|_| r.below(600)).collect()
}

#[test]
fn odd_config_is_what_we_think() {
    let cfg = ModelConfig::from_file(&odd_model_dir().join("config.json")).unwrap();
    assert_eq!(cfg.num_mla_layers(), 2);
    assert!(cfg.tie_word_embeddings && cfg.mla.q_lora_rank == Some(40));
    assert!(
        odd_model_dir()
            .join("model.safetensors.index.json")
            .is_file(),
        "sharded"
    );
}

#[test]
fn split_prefill_anywhere_equals_one_prefill() {
    for form in [MlaPrefill::Absorbed, MlaPrefill::Expanded] {
        split_prefill_case(form, CacheDtype::F32);
    }
    // Over a bf16 cache both forms run bf16 products (a query's bits never depend on which
    // other queries share its register group).
    for form in [MlaPrefill::Absorbed, MlaPrefill::Expanded] {
        split_prefill_case(form, CacheDtype::Bf16);
    }
}

fn split_prefill_case(form: MlaPrefill, cache_dtype: CacheDtype) {
    let m = KimiLinear::load(
        odd_model_dir(),
        ModelOptions {
            prefill_chunk: 10_000,
            cache_dtype,
            mla_prefill: form,
            ..Default::default()
        },
    )
    .expect("loads");
    let x = ids(200, 1);
    let mut st = m.new_state();
    let full = m
        .prefill(&x, &mut st, LogitsMode::All, &mut Probe::off())
        .unwrap();
    assert!(full.iter().all(|v| v.is_finite()));
    for cut in [1usize, 30, 63, 64, 65, 100, 199] {
        let mut s2 = m.new_state();
        let mut a = m
            .prefill(&x[..cut], &mut s2, LogitsMode::All, &mut Probe::off())
            .unwrap();
        a.extend(
            m.prefill(&x[cut..], &mut s2, LogitsMode::All, &mut Probe::off())
                .unwrap(),
        );
        assert_eq!(
            a, full,
            "{form:?}, {cache_dtype:?} cache, split at {cut}: prefill in two calls must equal one \
             call bit for bit"
        );
        for (l1, l2) in st.layers.iter().zip(&s2.layers) {
            if let (LayerState::Kda(p), LayerState::Kda(q)) = (l1, l2) {
                assert_eq!(p, q, "KDA state after split at {cut}");
                assert_close("conv state", &p.conv.concat(), &q.conv.concat(), 1e-5);
            }
        }
    }
}

#[test]
fn prefill_then_decode_equals_full_forward() {
    let m = load(64);
    let v = 600;
    for &t in &[1usize, 63, 64, 65, 200] {
        let x = ids(t, t as u64);
        let mut st = m.new_state();
        let full = m
            .prefill(&x, &mut st, LogitsMode::All, &mut Probe::off())
            .unwrap();
        let n = t.min(5);
        let mut s2 = m.new_state();
        if t > n {
            let last = m
                .prefill(&x[..t - n], &mut s2, LogitsMode::Last, &mut Probe::off())
                .unwrap();
            assert_close_rel(
                "last prefill row",
                &last,
                &full[(t - n - 1) * v..(t - n) * v],
                1e-5,
            );
        }
        for i in t - n..t {
            let l = m.decode(x[i], &mut s2, &mut Probe::off()).unwrap();
            assert_close_rel(
                &format!("T={t} decode step at {i}"),
                &l,
                &full[i * v..(i + 1) * v],
                1e-5,
            );
        }
        assert_eq!(s2.pos, t);
    }
}

#[test]
fn chunk_size_does_not_change_logits_on_a_long_prompt() {
    // The golden tiny model (realistic activation scales), 3000 tokens.
    let mut r = Rng(99);
    let x: Vec<u32> = (0..3000).map(|_| r.below(512)).collect();
    let load = |chunk, mla_prefill| {
        KimiLinear::load(
            &tiny_dir(),
            ModelOptions {
                prefill_chunk: chunk,
                cache_dtype: CacheDtype::F32,
                mla_prefill,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let run = |chunk, form| {
        let m = load(chunk, form);
        m.prefill(&x, &mut m.new_state(), LogitsMode::All, &mut Probe::off())
            .unwrap()
    };
    for form in [MlaPrefill::Absorbed, MlaPrefill::Expanded] {
        let reference = run(100_000, form);
        let diffs: Vec<(usize, f32)> = [1usize, 7, 64, 1000]
            .into_iter()
            .map(|chunk| (chunk, max_abs_diff(&run(chunk, form), &reference)))
            .collect();
        eprintln!("{form:?}: max |logit diff| vs one prefill, by prefill chunk: {diffs:?}");
        // The issue asks for ≤ 1e-5; the engine is bit-exact for a fixed attention form
        // (batch-invariant matmul and attention, KDA chunk carry).
        assert!(diffs.iter().all(|d| d.1 == 0.0), "{form:?}: {diffs:?}");
    }
    // The two forms, and `Auto` (which picks per chunk), agree to f32 noise.
    let absorbed = run(512, MlaPrefill::Absorbed);
    for form in [MlaPrefill::Expanded, MlaPrefill::Auto] {
        let d = max_abs_diff(&run(512, form), &absorbed);
        eprintln!("{form:?} vs Absorbed, chunk 512: max |logit diff| {d:e}");
        assert!(d < 1e-4, "{form:?} vs Absorbed: {d}");
    }
}

#[test]
fn absorbed_mla_equals_naive_mla() {
    let cfg = ModelConfig::from_file(&odd_model_dir().join("config.json")).unwrap();
    let ckpt = kl_weights::Checkpoint::open(odd_model_dir()).unwrap();
    let mla = Mla::load(
        &ckpt,
        "model.layers.1.self_attn.",
        cfg.mla,
        cfg.hidden,
        cfg.kv_norm_eps,
    )
    .unwrap();
    let d = cfg.hidden;
    let mut r = Rng(5);
    for &t in &[1usize, 63, 64, 65, 200] {
        let x: Vec<f32> = (0..t * d)
            .map(|_| r.below(2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut naive = vec![0f32; t * d];
        mla.forward_expanded_reference(&x, t, &mut naive);
        // Absorbed prefill of everything.
        let mut cache = LatentCache::new(
            cfg.mla.latent_width(),
            cfg.mla.kv_lora_rank,
            CacheDtype::F32,
        );
        let mut absorbed = vec![0f32; t * d];
        mla.forward(
            &x,
            t,
            &mut cache,
            MlaPrefill::Absorbed,
            &mut LProbe::off(),
            &mut Scratch::new(),
            &mut absorbed,
        );
        assert_close(&format!("absorbed prefill T={t}"), &absorbed, &naive, 1e-5);
        // Expanded prefill, in one call and in two.
        for cut in [t, t / 2] {
            let mut cache = LatentCache::new(
                cfg.mla.latent_width(),
                cfg.mla.kv_lora_rank,
                CacheDtype::F32,
            );
            let mut expanded = vec![0f32; t * d];
            for (a, b) in [(0, cut), (cut, t)] {
                if a == b {
                    continue;
                }
                mla.forward(
                    &x[a * d..b * d],
                    b - a,
                    &mut cache,
                    MlaPrefill::Expanded,
                    &mut LProbe::off(),
                    &mut Scratch::new(),
                    &mut expanded[a * d..b * d],
                );
            }
            let what = format!("expanded prefill T={t} cut {cut}");
            assert_close(&what, &expanded, &naive, 1e-5);
        }
        // Absorbed decode, one token at a time.
        let mut cache = LatentCache::new(
            cfg.mla.latent_width(),
            cfg.mla.kv_lora_rank,
            CacheDtype::F32,
        );
        let mut step = vec![0f32; d];
        for i in 0..t {
            mla.forward(
                &x[i * d..(i + 1) * d],
                1,
                &mut cache,
                MlaPrefill::Auto,
                &mut LProbe::off(),
                &mut Scratch::new(),
                &mut step,
            );
            assert_close(
                &format!("absorbed decode T={t} i={i}"),
                &step,
                &naive[i * d..(i + 1) * d],
                1e-5,
            );
        }
    }
}

/// A prefill keeps its workspace for the next one, within the planner's workspace figure; a
/// kept workspace (stale values from another prompt in it) changes no bit of a later prefill,
/// and `release_workspaces` frees it.
#[test]
fn kept_prefill_workspace_changes_nothing() {
    for form in [MlaPrefill::Absorbed, MlaPrefill::Expanded] {
        let m = load_form(64, form);
        assert_eq!(m.workspace_bytes_held(), 0, "nothing kept before a prefill");
        let run = |x: &[u32]| {
            m.prefill(x, &mut m.new_state(), LogitsMode::All, &mut Probe::off())
                .unwrap()
        };
        run(&ids(150, 3));
        let held = m.workspace_bytes_held();
        let planned =
            kl_model::plan::workspace_bytes(m.config(), 64, false, rayon::current_num_threads());
        assert!(
            held > 0 && held as u64 <= planned,
            "{form:?}: {held} bytes kept, planned {planned}"
        );
        let warm = run(&ids(130, 4));
        m.release_workspaces();
        assert_eq!(m.workspace_bytes_held(), 0, "released");
        // A new prefill chunk frees them too (they were sized for the old one); the same chunk
        // keeps them.
        let mut m3 = load_form(64, form);
        m3.prefill(
            &ids(150, 3),
            &mut m3.new_state(),
            LogitsMode::Last,
            &mut Probe::off(),
        )
        .unwrap();
        let opts = m3.options();
        m3.set_options(opts);
        assert!(
            m3.workspace_bytes_held() > 0,
            "{form:?}: the same chunk keeps them"
        );
        m3.set_options(ModelOptions {
            prefill_chunk: 32,
            ..opts
        });
        assert_eq!(
            m3.workspace_bytes_held(),
            0,
            "{form:?}: a new chunk frees them"
        );
        let cold = {
            let m2 = load_form(64, form);
            m2.prefill(
                &ids(130, 4),
                &mut m2.new_state(),
                LogitsMode::All,
                &mut Probe::off(),
            )
            .unwrap()
        };
        assert_eq!(warm, cold, "{form:?}: a kept workspace changed the logits");
    }
}
