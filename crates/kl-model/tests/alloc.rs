//! Decode allocates nothing per token after warm-up.
//!
//! A counting global allocator wraps the system one; after a prefill long enough for
//! flash-decoding (several attention segments) and a few warm-up tokens, decoding more tokens
//! must not allocate at all, on any thread; nor may the first token after a later prefill,
//! which folds the KDA layers' pending rows into their state.

use kl_config::presets;
use kl_kernels::kda::{kda_chunked, KdaShape};
use kl_layers::cache::CacheDtype;
use kl_model::{KimiLinear, LogitsMode, ModelOptions, Probe};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_allocates_nothing_after_warm_up() {
    // Two workers even on a one-core machine, so the parallel paths run.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    // The golden tiny model, and one whose attention has whole 16-head tiles and a latent row of
    // 64 + 32 (what the opt-in AMX attention takes: CI runs this test with KL_AMX=1 too).
    let tiny = presets::tiny();
    let mut tiles = presets::tiny();
    tiles.num_attention_heads = 16;
    tiles.num_key_value_heads = Some(16);
    tiles.head_dim = Some(tiles.hidden_size / 16);
    tiles.kv_lora_rank = 64;
    tiles.qk_rope_head_dim = 32;
    for (name, mut cfg) in [("tiny", tiny), ("16 heads", tiles)] {
        cfg.vocab_size = 512;
        decode_allocates_nothing(name, &cfg);
    }
}

fn decode_allocates_nothing(name: &str, cfg: &kl_config::RawConfig) {
    let tmp = tempfile::Builder::new()
        .prefix("kl-alloc-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    kl_weights::synth_checkpoint(cfg, dir, 3, 1 << 30).expect("synth");
    for dtype in [CacheDtype::Bf16, CacheDtype::Fp8, CacheDtype::F32] {
        let model = KimiLinear::load(
            dir,
            ModelOptions {
                cache_dtype: dtype,
                ..Default::default()
            },
        )
        .expect("loads");
        // Within one attention segment, and past two (the flash-decoding merge).
        for len in [100, 2100] {
            let mut st = model.new_state();
            let prompt: Vec<u32> = (0..len).map(|i| (i * 37 % 512) as u32).collect();
            st.reserve(len + 100);
            let mut logits = vec![0f32; 512];
            let mut probe = Probe::off();
            model
                .prefill(&prompt, &mut st, LogitsMode::Last, &mut probe)
                .expect("prefill");
            let mut id = 1u32;
            let mut step = |model: &KimiLinear, st: &mut kl_model::SequenceState, id: &mut u32| {
                model
                    .decode_into(*id, st, &mut probe, &mut logits)
                    .expect("decode");
                *id = (logits
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0) as u32;
            };
            // Each worker's chunked-KDA scratch is made once per thread, when it first runs a
            // head (which worker that is is up to the scheduler): every worker runs the kernel
            // once here, so that the later turns below meet only warmed threads.
            let kd = cfg.linear_attn_config.head_dim;
            rayon::broadcast(|_| {
                let s = KdaShape::new(1, 1, kd, kd);
                let (mut state, mut out) = (vec![0f32; kd * kd], vec![0f32; kd]);
                let x = vec![0f32; kd];
                kda_chunked(s, &x, &x, &x, &x, &[0.0], &mut state, &mut out);
            });
            let turn: Vec<u32> = (0..37).map(|i| (i * 11 % 512) as u32).collect();
            // Run on a pool worker, as the CLI does: a parallel region entered from outside the
            // pool queues a job in rayon's injector, which allocates a block now and then. One
            // region for the whole conversation, so that one thread's decode scratch serves it.
            let (n, firsts) = rayon::scope(|_| {
                for _ in 0..4 {
                    step(&model, &mut st, &mut id);
                }
                let before = ALLOCS.load(Ordering::SeqCst);
                for _ in 0..16 {
                    step(&model, &mut st, &mut id);
                }
                let n = ALLOCS.load(Ordering::SeqCst) - before;
                // Later turns: a prefill that leaves rows in each KDA layer's partial chunk,
                // then decode, whose first step folds them into the state.
                let firsts: Vec<usize> = (0..3)
                    .map(|_| {
                        model
                            .prefill(&turn, &mut st, LogitsMode::Last, &mut Probe::off())
                            .expect("prefill");
                        let before = ALLOCS.load(Ordering::SeqCst);
                        step(&model, &mut st, &mut id);
                        ALLOCS.load(Ordering::SeqCst) - before
                    })
                    .collect();
                (n, firsts)
            });
            assert_eq!(
                n, 0,
                "{name}, {dtype:?} cache, {len}-token prompt: {n} allocations in 16 decoded tokens"
            );
            assert_eq!(
                firsts,
                [0, 0, 0],
                "{name}, {dtype:?} cache, {len}-token prompt: allocations in the first decoded \
                 token of turns 2, 3 and 4"
            );
        }
    }
}
