//! Memory: planner arithmetic, agreement with the engine's own accounting, token limits,
//! cache dtypes and snapshots.

mod common;
use common::*;
use kl_config::{presets, ModelConfig};
use kl_model::plan::{self, PlanRequest};
use kl_model::snapshot::{load_state, save_state};
use kl_model::{
    CacheDtype, KimiLinear, LayerState, LogitsMode, MlaPrefill, ModelError, ModelOptions, Probe,
};

fn req(context: usize, cache_dtype: CacheDtype) -> PlanRequest {
    PlanRequest {
        context,
        cache_dtype,
        prefill_chunk: 512,
        all_logits: false,
        threads: 2,
    }
}

#[test]
fn real_config_at_one_million_tokens() {
    let cfg = ModelConfig::from_raw(presets::kimi_linear_48b_a3b()).unwrap();
    let f = plan::plan(&cfg, 0, req(1 << 20, CacheDtype::Bf16));
    assert_eq!(f.mla_cache_bytes, 8_455_716_864);
    assert_eq!(f.kda_state_bytes, 41_943_040);
    assert_eq!(f.conv_state_bytes, 20 * 3 * 3 * 4096 * 4);
    let fp8 = plan::plan(&cfg, 0, req(1 << 20, CacheDtype::Fp8));
    assert_eq!(fp8.mla_cache_bytes, 4_227_858_432 + 7 * 8 * (1 << 20));
    let c = plan::compare(&cfg, 1 << 20);
    assert_eq!(c.all_mla_bytes, 31_104 * (1 << 20));
    assert_eq!(c.mha_bytes, 442_368 * (1 << 20));
    assert_eq!(c.gqa8_bytes, 110_592 * (1 << 20));
}

fn tiny(dtype: CacheDtype, chunk: usize) -> KimiLinear {
    KimiLinear::load(
        &tiny_dir(),
        ModelOptions {
            cache_dtype: dtype,
            prefill_chunk: chunk,
            ..Default::default()
        },
    )
    .unwrap()
}

fn ids(n: usize) -> Vec<u32> {
    let mut r = Rng(17);
    (0..n).map(|_| r.below(512)).collect()
}

#[test]
fn planner_agrees_with_engine_accounting() {
    for dtype in [CacheDtype::F32, CacheDtype::Bf16, CacheDtype::Fp8] {
        let m = tiny(dtype, 128);
        for n in [1usize, 255, 256, 257, 700] {
            let mut st = m.new_state();
            m.prefill(&ids(n), &mut st, LogitsMode::Last, &mut Probe::off())
                .unwrap();
            let f = plan::plan(m.config(), 0, req(n, dtype));
            assert_eq!(
                st.mla_cache_bytes() as u64,
                f.mla_cache_bytes,
                "{dtype:?} n={n}"
            );
            assert_eq!(st.kda_state_bytes() as u64, f.kda_state_bytes);
            assert_eq!(st.conv_state_bytes() as u64, f.conv_state_bytes);
            assert_eq!(st.kda_carry_bytes() as u64, f.kda_carry_bytes);
        }
    }
}

#[test]
fn limit_stops_cleanly_without_allocating() {
    let m = tiny(CacheDtype::Bf16, 64);
    let mut st = m.new_state();
    st.set_limit(300, "memory budget 1MB");
    m.prefill(&ids(256), &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    let before = (st.pos, st.mla_cache_bytes());
    let e = m
        .prefill(&ids(100), &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap_err();
    assert!(matches!(e, ModelError::Limit { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("300") && msg.contains("memory budget 1MB") && msg.contains("356"),
        "{msg}"
    );
    assert_eq!(
        (st.pos, st.mla_cache_bytes()),
        before,
        "nothing consumed or allocated"
    );
    // Up to the limit is fine, then decode stops too.
    m.prefill(&ids(44), &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    assert!(matches!(
        m.decode(1, &mut st, &mut Probe::off()),
        Err(ModelError::Limit { .. })
    ));
}

#[test]
fn max_context_fits_the_budget() {
    let cfg = ModelConfig::from_raw(presets::kimi_linear_48b_a3b()).unwrap();
    let r = req(0, CacheDtype::Bf16);
    let budget = 16u64 << 30;
    let weights = 10u64 << 30;
    let ctx = plan::max_context(&cfg, weights, r, budget).unwrap();
    assert!(plan::plan(&cfg, weights, req(ctx, CacheDtype::Bf16)).total_bytes <= budget);
    assert!(plan::plan(&cfg, weights, req(ctx + 256, CacheDtype::Bf16)).total_bytes > budget);
    assert!(plan::max_context(&cfg, 20 << 30, r, budget).is_none());
}

/// Logit error of each cache dtype against f32 on the golden prompt (published in docs/memory.md).
#[test]
fn cache_dtypes_stay_within_published_tolerance() {
    let g = load_golden("golden_model.safetensors");
    let prompt: Vec<u32> = g["input_ids"].1.iter().map(|&x| x as u32).collect();
    let run = |dtype| {
        let m = tiny(dtype, 512);
        let mut st = m.new_state();
        m.prefill(&prompt, &mut st, LogitsMode::All, &mut Probe::off())
            .unwrap()
    };
    let f32l = run(CacheDtype::F32);
    assert_close("f32 cache vs golden", &f32l, &g["logits"].1, 1e-4);
    let bf = max_abs_diff(&run(CacheDtype::Bf16), &f32l);
    let f8 = max_abs_diff(&run(CacheDtype::Fp8), &f32l);
    eprintln!("cache dtype logit error vs f32: bf16 {bf:e}, fp8 {f8:e}");
    assert!(bf <= 2e-2, "bf16 cache error {bf}");
    assert!(f8 <= 2e-1, "fp8 cache error {f8}");
    // The expanded prefill form (what long prompts take) runs its own bf16 products
    // (`kl_kernels::expanded_bf16`); the same bounds, against the f32 cache in the same form.
    let expanded = |dtype| {
        let m = KimiLinear::load(
            &tiny_dir(),
            ModelOptions {
                cache_dtype: dtype,
                prefill_chunk: 512,
                mla_prefill: MlaPrefill::Expanded,
                ..Default::default()
            },
        )
        .unwrap();
        let mut st = m.new_state();
        m.prefill(&prompt, &mut st, LogitsMode::All, &mut Probe::off())
            .unwrap()
    };
    let f32e = expanded(CacheDtype::F32);
    assert_close(
        "f32 cache, expanded, vs golden",
        &f32e,
        &g["logits"].1,
        1e-4,
    );
    let bf = max_abs_diff(&expanded(CacheDtype::Bf16), &f32e);
    let f8 = max_abs_diff(&expanded(CacheDtype::Fp8), &f32e);
    eprintln!("expanded form, cache dtype logit error vs f32: bf16 {bf:e}, fp8 {f8:e}");
    assert!(bf <= 2e-2, "bf16 cache error, expanded form {bf}");
    assert!(f8 <= 2e-1, "fp8 cache error, expanded form {f8}");
}

#[test]
fn snapshots_round_trip_bit_exactly() {
    let tmp = tempfile::Builder::new()
        .prefix("kl-snap-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    for dtype in [CacheDtype::F32, CacheDtype::Bf16, CacheDtype::Fp8] {
        let m = tiny(dtype, 64);
        let mut st = m.new_state();
        m.prefill(&ids(300), &mut st, LogitsMode::Last, &mut Probe::off())
            .unwrap();
        let path = dir.join(format!("{}.klstate", dtype.name()));
        save_state(&st, m.config(), &path).unwrap();
        let mut back = load_state(&path, m.config()).unwrap();
        assert_eq!(back.pos, st.pos);
        for (a, b) in st.layers.iter().zip(&back.layers) {
            match (a, b) {
                (LayerState::Kda(x), LayerState::Kda(y)) => assert_eq!(x, y),
                (LayerState::Mla(x), LayerState::Mla(y)) => {
                    let (mut bx, mut by) = (Vec::new(), Vec::new());
                    x.write_raw(&mut bx).unwrap();
                    y.write_raw(&mut by).unwrap();
                    assert!(!bx.is_empty());
                    assert_eq!(bx, by)
                }
                _ => panic!("layer kinds differ"),
            }
        }
        let l1 = m.decode(5, &mut st, &mut Probe::off()).unwrap();
        let l2 = m.decode(5, &mut back, &mut Probe::off()).unwrap();
        assert_eq!(l1, l2, "{dtype:?}: decode after load must be bit-identical");
        // A file cut short anywhere, or with bytes after the payload, is refused by name.
        let whole = std::fs::read(&path).unwrap();
        for cut in [whole.len() - 1, whole.len() / 2, 20] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let e = load_state(&path, m.config()).unwrap_err().to_string();
            assert!(e.contains("truncated"), "{dtype:?}, cut at {cut}: {e}");
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let e = load_state(&path, m.config()).unwrap_err().to_string();
        assert!(e.contains("trailing bytes"), "{dtype:?}: {e}");
        // A header whose per-layer sizes are fewer than the layers is refused, not indexed.
        let hlen = u64::from_le_bytes(whole[8..16].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&whole[16..16 + hlen]).unwrap();
        h["sizes"].as_array_mut().unwrap().pop();
        let hb = serde_json::to_vec(&h).unwrap();
        let mut short = whole[..8].to_vec();
        short.extend_from_slice(&(hb.len() as u64).to_le_bytes());
        short.extend_from_slice(&hb);
        short.extend_from_slice(&whole[16 + hlen..]);
        std::fs::write(&path, &short).unwrap();
        let e = load_state(&path, m.config()).unwrap_err().to_string();
        assert!(e.contains("layer sizes"), "{dtype:?}: {e}");
        std::fs::write(&path, &whole).unwrap();
        assert!(load_state(&path, m.config()).is_ok());
        // A snapshot refuses another model and garbage.
        std::fs::write(&path, b"nonsense").unwrap();
        assert!(load_state(&path, m.config())
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }
}

/// The prefill chunk when none is asked for: 2048 for any model with MLA layers (every Kimi
/// Linear config: `mini`, the 16-expert benchmark shape, the released model); without them, 512,
/// or for a mixture of many experts enough that each expert sees about 64 rows of a chunk. 0
/// resolves to it in a built model and in a plan, and an explicit chunk is kept.
#[test]
fn prefill_chunk_is_chosen_by_mla_and_experts_per_chunk() {
    let released = ModelConfig::from_raw(presets::kimi_linear_48b_a3b()).unwrap();
    assert_eq!(kl_model::auto_prefill_chunk(&released), 2048);
    let mini = ModelConfig::from_raw(presets::mini()).unwrap();
    assert_eq!(kl_model::auto_prefill_chunk(&mini), 2048);
    let mut raw = presets::kimi_linear_48b_a3b();
    raw.num_experts = Some(16);
    let sixteen = ModelConfig::from_raw(raw).unwrap();
    assert_eq!(kl_model::auto_prefill_chunk(&sixteen), 2048);
    // Without MLA layers the experts decide: 16 experts (top 8) keep 512; 64 experts, top 6:
    // rounded up to a power of two; 1024 experts: capped.
    let no_mla = |experts: usize, top_k: usize| {
        let mut raw = presets::kimi_linear_48b_a3b();
        let n = raw.num_hidden_layers;
        raw.linear_attn_config.kda_layers = (1..=n as i64).collect();
        raw.linear_attn_config.full_attn_layers = Vec::new();
        (raw.num_experts, raw.num_experts_per_token) = (Some(experts), Some(top_k));
        let c = ModelConfig::from_raw(raw).unwrap();
        assert_eq!(c.num_mla_layers(), 0);
        kl_model::auto_prefill_chunk(&c)
    };
    assert_eq!(no_mla(16, 8), 512);
    assert_eq!(no_mla(64, 6), 1024, "64·64/6 = 683 → 1024");
    assert_eq!(no_mla(1024, 8), kl_model::MAX_AUTO_PREFILL_CHUNK);
    assert_eq!(kl_model::prefill_chunk_for(&released, 300), 300);

    // In a plan: 0 plans for the automatic chunk.
    let auto = PlanRequest {
        prefill_chunk: 0,
        ..req(1 << 17, CacheDtype::Bf16)
    };
    let explicit = PlanRequest {
        prefill_chunk: 2048,
        ..auto
    };
    assert_eq!(
        plan::plan(&released, 0, auto),
        plan::plan(&released, 0, explicit)
    );
    assert!(
        plan::plan(&released, 0, explicit).workspace_bytes
            > plan::plan(&released, 0, req(1 << 17, CacheDtype::Bf16)).workspace_bytes
    );

    // In a built model: the tiny model (MLA layers) resolves 0 to 2048 and keeps 128.
    assert_eq!(tiny(CacheDtype::F32, 0).options().prefill_chunk, 2048);
    assert_eq!(tiny(CacheDtype::F32, 128).options().prefill_chunk, 128);
}
