//! Session, chat, snapshots and stop strings on real (tiny) models.

use kl_engine::{
    argmax, Chat, EngineError, Sampler, SamplingParams, Session, StopReason, StopRules,
};
use kl_model::{
    CacheDtype, KimiLinear, LayerState, LogitsMode, ModelOptions, Probe, SequenceState,
};
use kl_tokenizer::{StreamDecoder, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// A fresh empty directory `kl-engine-<tag>-*` under the system temp dir, removed when the
/// guard drops (also when the test panics).
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kl-engine-{tag}-"))
        .tempdir()
        .unwrap()
}

/// [`kl_testkit::build_dir_fixture`] under this test binary's `CARGO_TARGET_TMPDIR`.
fn build_dir_fixture(name: &str, fill: impl FnOnce(&Path)) -> PathBuf {
    kl_testkit::build_dir_fixture(Path::new(env!("CARGO_TARGET_TMPDIR")), name, fill)
}

/// A synthetic checkpoint with the golden tiny dims and a tokenizer (written once per run,
/// under the build dir).
fn synth_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_dir_fixture("kl-engine-synth", |d| {
            kl_weights::synth_checkpoint(&kl_config::presets::tiny(), d, 11, 1 << 30).unwrap();
        })
    })
}

fn opts() -> ModelOptions {
    ModelOptions {
        cache_dtype: CacheDtype::F32,
        ..Default::default()
    }
}

fn synth_session() -> Session {
    let dir = synth_dir();
    let model = Arc::new(KimiLinear::load(dir, opts()).unwrap());
    let tok = Arc::new(Tokenizer::from_dir(dir).unwrap());
    Session::new(model, Some(tok))
}

fn no_eos() -> StopRules {
    StopRules {
        ignore_eos: true,
        ..Default::default()
    }
}

/// Max |a − b| over the KDA conv and recurrent states and the latent rows (∞ on a shape mismatch).
fn state_diff(a: &SequenceState, b: &SequenceState) -> f32 {
    let dims = kl_config::presets::tiny();
    let dims = kl_config::ModelConfig::from_raw(dims).unwrap().kda;
    assert_eq!(a.pos, b.pos, "positions differ");
    let max = |x: &[f32], y: &[f32]| {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    let mut d = 0f32;
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        match (la, lb) {
            (LayerState::Kda(x), LayerState::Kda(y)) => {
                d = d.max(max(
                    &x.current_recurrent(&dims),
                    &y.current_recurrent(&dims),
                ));
                for (cx, cy) in x.conv.iter().zip(&y.conv) {
                    d = d.max(max(cx, cy));
                }
            }
            (LayerState::Mla(x), LayerState::Mla(y)) => {
                assert_eq!(x.len(), y.len());
                for i in 0..x.len() {
                    d = d.max(max(&x.row(i), &y.row(i)));
                }
            }
            _ => return f32::INFINITY,
        }
    }
    d
}

#[test]
fn greedy_session_equals_direct_argmax_decoding() {
    let mut s = synth_session();
    let prompt = s
        .tokenize("Hello, world! The quick brown fox", true)
        .unwrap();
    s.feed(&prompt).unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let stats = s.generate(&mut sampler, 12, &no_eos(), |_| {}).unwrap();
    assert_eq!(stats.stop_reason, StopReason::MaxTokens);
    assert_eq!(stats.prompt_tokens, prompt.len());
    assert_eq!(stats.context_used, prompt.len() + 12);

    let model = s.model().clone();
    let mut st = model.new_state();
    let mut l = model
        .prefill(&prompt, &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    let mut want = Vec::new();
    for _ in 0..12 {
        let id = argmax(&l);
        want.push(id);
        l = model.decode(id, &mut st, &mut Probe::off()).unwrap();
    }
    assert_eq!(stats.ids, want);
    assert_eq!(&s.history()[prompt.len()..], &want[..]);
    assert_eq!(s.last_logits().unwrap(), &l[..]);
    assert_eq!(state_diff(s.state(), &st), 0.0);
}

#[test]
fn golden_tiny_greedy_ids_without_tokenizer() {
    let path = shared().join("golden/golden_model.safetensors");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("golden file {} is required: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64);
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let input: Vec<u32> = i64s("input_ids").iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = i64s("greedy.generated_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let dir = shared().join("golden/kimi_linear_tiny");
    let model = Arc::new(KimiLinear::load(&dir, opts()).unwrap());
    let mut s = Session::new(model, None);
    s.feed(&input).unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let stats = s
        .generate(&mut sampler, want.len(), &StopRules::default(), |t| {
            panic!("no tokenizer, yet text {t:?}")
        })
        .unwrap();
    assert_eq!(stats.ids, want);
    assert_eq!(stats.stop_reason, StopReason::MaxTokens);
    // Text-level features are refused without a tokenizer.
    let err = s
        .generate(&mut sampler, 1, &StopRules::with_strings(["x"]), |_| {})
        .unwrap_err();
    assert!(matches!(err, EngineError::NoTokenizer(_)), "{err}");
}

/// Greedy sampling that can only produce printable ASCII bytes (which re-tokenize to the same
/// ids with the byte-level synthetic tokenizer) or an end-of-sequence id.
fn ascii_only(s: &Session) -> SamplingParams {
    let vocab = s.model().config().vocab_size as u32;
    let tok = s.tokenizer().unwrap();
    let allowed: Vec<u32> = (0x20u8..0x7f)
        .map(|b| tok.token_id(&(b as char).to_string()).unwrap())
        .chain(s.eos_ids().iter().copied())
        .collect();
    SamplingParams {
        logit_bias: (0..vocab)
            .filter(|id| !allowed.contains(id))
            .map(|id| (id, f32::NEG_INFINITY))
            .collect(),
        ..SamplingParams::greedy()
    }
}

#[test]
fn multi_turn_chat_feeds_only_new_tokens_and_matches_one_prefill() {
    let s = synth_session();
    let params = ascii_only(&s);
    let mut chat = Chat::new(s, Some("You are terse.".into())).unwrap();
    let mut sampler = Sampler::new(params);
    let mut previous = 0;
    for (i, user) in ["Hi there!", "Count: 1, 2, 3?", "Thanks, bye."]
        .iter()
        .enumerate()
    {
        let mut streamed = String::new();
        let turn = chat
            .send(user, &mut sampler, 6 + 3 * i, &StopRules::default(), |t| {
                streamed.push_str(t)
            })
            .unwrap();
        assert!(!turn.sync.reprefilled, "turn {i} re-prefilled");
        assert_eq!(turn.reply, streamed);
        assert!(turn.reply.is_ascii());
        // Only the new turn was fed: the history before it was kept.
        assert_eq!(turn.stats.prompt_tokens, turn.sync.fed_tokens);
        let used = chat.session().context_used();
        assert_eq!(
            used,
            previous + turn.sync.fed_tokens + turn.stats.generated_tokens
        );
        previous = used;
    }
    assert_eq!(chat.messages().len(), 7);
    // Close the last turn (a no-op if it ended at <|im_end|>), then compare with one prefill.
    let closed = chat.sync(false).unwrap();
    assert!(!closed.reprefilled);
    let ids = chat.render_ids(false).unwrap();
    assert_eq!(chat.session().history(), &ids[..]);
    let model = chat.session().model().clone();
    let mut st = model.new_state();
    model
        .prefill(&ids, &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    let d = state_diff(chat.session().state(), &st);
    assert!(d <= 1e-5, "state differs from one prefill by {d}");
}

#[test]
fn chat_reprefills_when_the_state_diverges() {
    let s = synth_session();
    let params = ascii_only(&s);
    let mut chat = Chat::new(s, None).unwrap();
    let mut sampler = Sampler::new(params);
    chat.send("One", &mut sampler, 4, &StopRules::default(), |_| {})
        .unwrap();
    // Something the template will not render: the next turn must start over.
    chat.session_mut().feed(&[65, 66]).unwrap();
    let turn = chat
        .send("Two", &mut sampler, 4, &StopRules::default(), |_| {})
        .unwrap();
    assert!(turn.sync.reprefilled);
    let hist = chat.session().history().to_vec();
    let n = hist.len() - turn.stats.generated_tokens;
    assert_eq!(turn.sync.fed_tokens, n);
    let model = chat.session().model().clone();
    let mut st = model.new_state();
    model
        .prefill(&hist, &mut st, LogitsMode::Last, &mut Probe::off())
        .unwrap();
    assert!(state_diff(chat.session().state(), &st) <= 1e-5);
}

#[test]
fn save_and_load_continue_exactly() {
    let dir = temp_dir("snap");
    let params = SamplingParams {
        temperature: 1.0,
        seed: 5,
        ..Default::default()
    };
    let mut a = synth_session();
    let prompt = a.tokenize("Once upon a time", true).unwrap();
    a.feed(&prompt).unwrap();
    let mut sampler = Sampler::new(params);
    a.generate(&mut sampler, 5, &no_eos(), |_| {}).unwrap();
    let path = dir.path().join("state.bin");
    a.save(&path).unwrap();
    let saved_sampler = sampler.clone();
    let mut text_a = String::new();
    let rest_a = a
        .generate(&mut sampler, 10, &no_eos(), |t| text_a.push_str(t))
        .unwrap();

    let mut b = synth_session();
    b.load(&path).unwrap();
    assert_eq!(b.history().len(), prompt.len() + 5);
    let mut sampler = saved_sampler;
    let mut text_b = String::new();
    let rest_b = b
        .generate(&mut sampler, 10, &no_eos(), |t| text_b.push_str(t))
        .unwrap();
    assert_eq!(rest_a.ids, rest_b.ids);
    assert_eq!(text_a, text_b);
    assert_eq!(a.history(), b.history());
    assert_eq!(state_diff(a.state(), b.state()), 0.0);

    // Saved right after a prefill (nothing generated yet).
    let mut c = synth_session();
    c.feed(&prompt).unwrap();
    let p2 = dir.path().join("prefill.bin");
    c.save(&p2).unwrap();
    let mut d = synth_session();
    d.load(&p2).unwrap();
    let greedy = |s: &mut Session| {
        s.generate(
            &mut Sampler::new(SamplingParams::greedy()),
            6,
            &no_eos(),
            |_| {},
        )
        .unwrap()
        .ids
    };
    assert_eq!(greedy(&mut c), greedy(&mut d));
    assert_eq!(state_diff(c.state(), d.state()), 0.0);

    // Chat snapshots carry the messages too.
    let s = synth_session();
    let p = ascii_only(&s);
    let mut chat = Chat::new(s, Some("sys".into())).unwrap();
    let mut sm = Sampler::new(p);
    chat.send("hello", &mut sm, 4, &StopRules::default(), |_| {})
        .unwrap();
    let cpath = dir.path().join("chat.bin");
    chat.save(&cpath).unwrap();
    let mut other = Chat::new(synth_session(), Some("sys".into())).unwrap();
    other.load(&cpath).unwrap();
    assert_eq!(other.messages(), chat.messages());
    assert_eq!(other.session().history(), chat.session().history());

    // A snapshot without its sidecar, or a sidecar for another state, is refused.
    std::fs::remove_file(kl_engine::sidecar_path(&path)).unwrap();
    let e = b.load(&path).unwrap_err().to_string();
    assert!(e.contains("state.bin.session"), "{e}");
    std::fs::copy(
        kl_engine::sidecar_path(&cpath),
        kl_engine::sidecar_path(&path),
    )
    .unwrap();
    let e = b.load(&path).unwrap_err().to_string();
    assert!(e.contains("do not belong together"), "{e}");
}

#[test]
fn stop_strings_end_generation_even_across_tokens() {
    let mut s = synth_session();
    let prompt = s.tokenize("Stop here:", true).unwrap();
    s.feed(&prompt).unwrap();
    let mut full = String::new();
    let stats = s
        .generate(
            &mut Sampler::new(SamplingParams::greedy()),
            40,
            &no_eos(),
            |t| full.push_str(t),
        )
        .unwrap();
    // Per-token text, to pick a stop string that straddles a token boundary.
    let tok = s.tokenizer().unwrap().clone();
    let mut dec = StreamDecoder::new();
    let pieces: Vec<String> = stats
        .ids
        .iter()
        .map(|&id| dec.push(&tok, id).unwrap())
        .collect();
    assert_eq!(pieces.concat() + &dec.finish(), full);
    let k = (0..pieces.len() - 1)
        .find(|&k| !pieces[k].is_empty() && !pieces[k + 1].is_empty())
        .expect("two adjacent tokens with text");
    let last = pieces[k].chars().last().unwrap();
    let first = pieces[k + 1].chars().next().unwrap();
    let stop = format!("{last}{first}");
    let cut = full.find(&stop).unwrap();

    let mut s2 = synth_session();
    s2.feed(&prompt).unwrap();
    let mut shown = String::new();
    let rules = StopRules {
        stop_strings: vec!["never-appears".into(), stop.clone()],
        ignore_eos: true,
        ..Default::default()
    };
    let st2 = s2
        .generate(
            &mut Sampler::new(SamplingParams::greedy()),
            40,
            &rules,
            |t| shown.push_str(t),
        )
        .unwrap();
    assert_eq!(st2.stop_reason, StopReason::StopString(1));
    assert_eq!(shown, full[..cut], "stop string {stop:?}");
    assert!(st2.generated_tokens < 40);
    assert_eq!(&st2.ids[..], &stats.ids[..st2.ids.len()]);
}

#[test]
fn eos_is_consumed_and_context_limits_are_enforced() {
    let mut s = synth_session();
    let eos = s.eos_ids().to_vec();
    assert!(eos.contains(&(256 + 2)), "<|im_end|> is an eos id: {eos:?}");
    // Force the first sampled token to be <|im_end|>.
    let prompt = s.tokenize("x", true).unwrap();
    s.feed(&prompt).unwrap();
    let mut sampler = Sampler::new(SamplingParams {
        logit_bias: vec![(258, 1e9)],
        ..SamplingParams::greedy()
    });
    let stats = s
        .generate(&mut sampler, 5, &StopRules::default(), |_| {})
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Eos(258));
    assert_eq!(s.history().last(), Some(&258));
    assert_eq!(s.context_used(), prompt.len() + 1);

    s.reset();
    assert_eq!(s.context_used(), 0);
    assert!(matches!(
        s.generate(&mut sampler, 1, &StopRules::default(), |_| {}),
        Err(EngineError::NothingToContinue)
    ));
    s.set_max_context(6, "test limit");
    let e = s.feed(&[1; 7]).unwrap_err();
    assert!(
        matches!(e, EngineError::ContextFull { limit: 6, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("test limit"));
    s.feed(&[1; 4]).unwrap();
    let stats = s
        .generate(
            &mut Sampler::new(SamplingParams::greedy()),
            10,
            &no_eos(),
            |_| {},
        )
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::ContextFull);
    assert_eq!(stats.generated_tokens, 2);
    assert_eq!(s.context_used(), 6);
}
