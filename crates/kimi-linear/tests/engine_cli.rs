//! `tokenize`, `detokenize`, `chat-template`, `run` and `chat` as a user runs them.

mod common;

use common::{build_dir_fixture, expect_error, expect_usage_error, run, shared, temp_dir, TestDir};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn tok_dir() -> PathBuf {
    shared().join("golden/tokenizer")
}

fn expected() -> Value {
    let p = tok_dir().join("expected.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("golden file {} is required: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn ok(out: &Output) -> (String, String) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    (String::from_utf8(out.stdout.clone()).unwrap(), err)
}

/// A synthetic tiny model with tokenizer files, written once per test binary by the binary
/// itself (under the build dir, see `build_dir_fixture`).
fn synth() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_dir_fixture("kl-cli-engine-synth", |d| {
            ok(&run(&[
                "synth",
                "--preset",
                "tiny",
                "--out",
                &s(d),
                "--seed",
                "3",
            ]));
        })
    })
}

/// A copy of the synthetic model whose config.json is changed by `edit`.
fn synth_copy(tag: &str, edit: impl FnOnce(&mut Value)) -> TestDir {
    let d = temp_dir(tag);
    for e in std::fs::read_dir(synth()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let cfg = d.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    d
}

fn with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kimi-linear"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn tokenize_matches_the_golden_ids() {
    let exp = expected();
    let dir = temp_dir("tokenize");
    let td = s(&tok_dir());
    let cases = exp["encode_cases"].as_array().unwrap();
    assert!(cases.len() > 3);
    for (i, case) in cases.iter().enumerate() {
        let f = dir.join(format!("{i}.txt"));
        std::fs::write(&f, case["text"].as_str().unwrap()).unwrap();
        let (out, _) = ok(&run(&["tokenize", "--tokenizer", &td, "--file", &s(&f)]));
        let ids: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids, case["ids"], "case {}", case["name"]);
        let (out, _) = ok(&run(&[
            "tokenize",
            "--tokenizer",
            &td,
            "--file",
            &s(&f),
            "--no-special",
        ]));
        let ids: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            ids, case["ids_ordinary"],
            "case {} (no special)",
            case["name"]
        );
    }
    let (out, _) = ok(&run(&[
        "tokenize",
        "--tokenizer",
        &td,
        "--text",
        "Hello, world!",
    ]));
    assert_eq!(out, "[2913,369,11,2836,1062,0]\n");
}

#[test]
fn detokenize_prints_exactly_the_text() {
    let exp = expected();
    let dir = temp_dir("detokenize");
    let td = s(&tok_dir());
    for (i, case) in exp["decode_cases"].as_array().unwrap().iter().enumerate() {
        let f = dir.join(format!("{i}.json"));
        std::fs::write(&f, case["ids"].to_string()).unwrap();
        let (out, _) = ok(&run(&["detokenize", "--tokenizer", &td, "--ids", &s(&f)]));
        assert_eq!(out, case["text"].as_str().unwrap(), "case {}", case["name"]);
    }
}

#[test]
fn chat_template_renders_the_golden_bytes() {
    let exp = expected();
    let dir = temp_dir("chat-template");
    let td = s(&tok_dir());
    for (i, case) in exp["chat_cases"].as_array().unwrap().iter().enumerate() {
        let m = dir.join(format!("{i}.messages.json"));
        std::fs::write(&m, case["messages"].to_string()).unwrap();
        let out_file = dir.join(format!("{i}.txt"));
        let mut args = vec!["chat-template", "--tokenizer", &td];
        let (ms, os) = (s(&m), s(&out_file));
        args.extend(["--messages", &ms, "--output", &os]);
        let t = dir.join(format!("{i}.tools.json"));
        let ts = s(&t);
        if !case["tools"].is_null() {
            std::fs::write(&t, case["tools"].to_string()).unwrap();
            args.extend(["--tools", &ts]);
        }
        if case["add_generation_prompt"] == true {
            args.push("--add-generation-prompt");
        }
        let (stdout, _) = ok(&run(&args));
        assert!(stdout.is_empty());
        let got = std::fs::read(&out_file).unwrap();
        let want = case["rendered"].as_str().unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want, "case {}", case["name"]);
        // The same bytes on stdout without --output, and they encode to the golden ids.
        let args: Vec<&str> = args
            .into_iter()
            .filter(|a| *a != "--output" && *a != os)
            .collect();
        let (stdout, _) = ok(&run(&args));
        assert_eq!(stdout, want);
        let (ids, _) = ok(&run(&["tokenize", "--tokenizer", &td, "--file", &os]));
        assert_eq!(serde_json::from_str::<Value>(&ids).unwrap(), case["ids"]);
    }
}

fn stats_line(err: &str) -> &str {
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stats line expected on stderr: {err}"
    );
    let l = lines[0];
    for needle in [
        "prompt:",
        "tok/s",
        "generated:",
        "context:",
        "peak RSS",
        "state ",
    ] {
        assert!(l.contains(needle), "stats line lacks {needle}: {l}");
    }
    l
}

#[test]
fn run_streams_text_and_one_stats_line() {
    let m = s(synth());
    let args = [
        "run",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "-n",
        "8",
        "--ignore-eos",
        "--seed",
        "1",
    ];
    let (out, err) = ok(&run(&args));
    assert!(!out.is_empty());
    assert!(stats_line(&err).contains("generated: 8 tokens"), "{err}");
    // A seed fixes the output; greedy too.
    assert_eq!(ok(&run(&args)).0, out);
    let greedy = [
        "run",
        "--model",
        &m,
        "--prompt-file",
        "",
        "--temperature",
        "0",
        "-n",
        "6",
    ];
    let dir = temp_dir("run");
    let pf = dir.join("prompt.txt");
    std::fs::write(&pf, "Tell me a story.").unwrap();
    let pfs = s(&pf);
    let mut g = greedy.to_vec();
    g[4] = &pfs;
    let (a, _) = ok(&run(&g));
    let (b, _) = ok(&run(&g));
    assert_eq!(a, b);
    // Chat wrapping with a system message, and a stop string.
    let (_, err) = ok(&run(&[
        "run",
        "--model",
        &m,
        "--prompt",
        "Hi",
        "--chat",
        "--system",
        "Be brief.",
        "-n",
        "4",
        "--stop",
        "\n\n",
        "--top-k",
        "0",
        "--min-p",
        "0",
        "--repeat-penalty",
        "1.1",
    ]));
    stats_line(&err);
}

#[test]
fn run_finds_a_repo_id_in_the_hf_cache() {
    let cache = temp_dir("hf-cache");
    let snap = cache.join("models--acme--tiny/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("models--acme--tiny/refs")).unwrap();
    std::fs::write(cache.join("models--acme--tiny/refs/main"), "abc123").unwrap();
    for e in std::fs::read_dir(synth()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kimi-linear"))
        .args([
            "run",
            "--model",
            "acme/tiny",
            "--prompt",
            "Hi",
            "-n",
            "2",
            "--ignore-eos",
        ])
        .env("HF_HUB_CACHE", cache.as_os_str())
        .output()
        .unwrap();
    ok(&out);
    let out = Command::new(env!("CARGO_BIN_EXE_kimi-linear"))
        .args(["run", "--model", "acme/missing", "--prompt", "Hi"])
        .env("HF_HUB_CACHE", cache.as_os_str())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the Hugging Face cache"));
}

fn between<'a>(err: &'a str, start: &str, end: &str) -> &'a str {
    let i = err
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in {err}"))
        + start.len();
    let j = err[i..].find(end).unwrap() + i;
    &err[i..j]
}

#[test]
fn chat_with_piped_stdin_saves_resets_and_loads() {
    let m = s(synth());
    let dir = temp_dir("chat");
    let snap = s(&dir.join("conv.state"));
    let chat = |input: &str| {
        let out = with_stdin(
            &[
                "chat",
                "--model",
                &m,
                "--system",
                "Be kind.",
                "--temperature",
                "0",
                "-n",
                "6",
            ],
            input,
        );
        ok(&out)
    };
    let (a, err) = chat(&format!(
        "Hello\nHow are you?\n/save {snap}\n/reset\nAgain\n/load {snap}\nMore\n"
    ));
    assert!(err.contains("[conversation reset]"), "{err}");
    let saved = between(&err, "[saved ", " tokens");
    assert_eq!(between(&err, "[loaded ", " tokens"), saved);
    assert!(err.contains("5 messages"), "{err}");
    // Greedy replies: P = the first two turns, D = "Again" on a fresh conversation.
    let (p, _) = chat("Hello\nHow are you?\n");
    let (d, _) = chat("Again\n");
    assert!(a.starts_with(&(p.clone() + &d)), "a={a:?} p={p:?} d={d:?}");
    // After /load, "More" continues the saved conversation exactly like one that never left it.
    let (b, _) = chat("Hello\nHow are you?\nMore\n");
    assert_eq!(&a[p.len() + d.len()..], &b[p.len()..]);
    // Ctrl-D right away quits cleanly.
    let (empty, _) = chat("");
    assert!(empty.is_empty());
}

#[test]
fn errors_are_clear_and_exit_1() {
    let golden_model = s(&shared().join("golden/kimi_linear_tiny"));
    let td = s(&tok_dir());
    let dir = temp_dir("engine-errors");
    // No tokenizer files.
    expect_error(
        &["tokenize", "--tokenizer", &golden_model, "--text", "hi"],
        &["tokenizer file not found", "tiktoken.model"],
    );
    expect_error(
        &["run", "--model", &golden_model, "--prompt", "hi"],
        &["has no tokenizer"],
    );
    expect_error(&["chat", "--model", &golden_model], &["has no tokenizer"]);
    // Bad messages JSON, messages of the wrong shape.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "[{\"role\": \"user\",").unwrap();
    expect_error(
        &["chat-template", "--tokenizer", &td, "--messages", &s(&bad)],
        &["bad.json", "not valid JSON"],
    );
    std::fs::write(&bad, "{\"role\": \"user\"}").unwrap();
    expect_error(
        &["chat-template", "--tokenizer", &td, "--messages", &s(&bad)],
        &["expected a JSON array"],
    );
    // A template that uses an unknown variable.
    let tdir = dir.join("tok");
    std::fs::create_dir_all(&tdir).unwrap();
    for f in ["tiktoken.model", "tokenizer_config.json"] {
        std::fs::copy(tok_dir().join(f), tdir.join(f)).unwrap();
    }
    std::fs::write(
        tdir.join("chat_template.jinja"),
        "{{ no_such_variable.field }}",
    )
    .unwrap();
    let msgs = dir.join("m.json");
    std::fs::write(&msgs, "[{\"role\": \"user\", \"content\": \"hi\"}]").unwrap();
    expect_error(
        &[
            "chat-template",
            "--tokenizer",
            &s(&tdir),
            "--messages",
            &s(&msgs),
        ],
        &["chat template"],
    );
    // Ids out of range.
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[1, 99999]").unwrap();
    expect_error(
        &["detokenize", "--tokenizer", &td, "--ids", &s(&ids)],
        &["element 1", "99999"],
    );
    // A prompt longer than the model's limit, or than --ctx-size.
    let small_dir = synth_copy("small-ctx", |v| v["model_max_length"] = 4.into());
    let small = s(&small_dir);
    expect_error(
        &[
            "run",
            "--model",
            &small,
            "--prompt",
            "far too long a prompt",
        ],
        &[
            "more than the context limit of 4 tokens",
            "model_max_length",
        ],
    );
    let m = s(synth());
    expect_error(
        &[
            "run",
            "--model",
            &m,
            "--prompt",
            "far too long",
            "--ctx-size",
            "3",
        ],
        &["context limit of 3 tokens", "--ctx-size 3"],
    );
    expect_error(
        &["run", "--model", &m, "--prompt", "x", "--top-p", "0"],
        &["top-p"],
    );
    // A zero prefill chunk is a usage error (it had been taken as one token per chunk).
    for cmd in ["run", "bench", "forward", "plan"] {
        expect_usage_error(
            &[cmd, "--model", &m, "--prefill-chunk", "0"],
            &["--prefill-chunk"],
        );
    }
    // An unknown attention form is a usage error that names the flag and lists the forms, in
    // every command that takes it.
    for cmd in ["run", "chat", "bench", "forward"] {
        expect_usage_error(
            &[cmd, "--model", &m, "--mla-prefill", "dense"],
            &["--mla-prefill", "auto, absorbed, expanded"],
        );
    }
    // A failed chat command is reported, the chat goes on, and the exit status says so.
    let out = with_stdin(
        &["chat", "--model", &m, "-n", "2"],
        &format!("/load {}\nhi\n", s(&dir.join("missing.state"))),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot load") && err.contains("missing.state"),
        "{err}"
    );
    assert!(
        err.contains("reply 2 tokens") || err.contains("reply 1 tokens"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// With `--memory-budget` and no `--prefill-chunk`, a model whose many experts get a larger
/// automatic prefill chunk takes a smaller one when only that fits the budget, and says so; with
/// the larger chunk asked for, the refusal says that 512-token chunks would fit.
#[test]
fn budget_shrinks_the_automatic_prefill_chunk() {
    // The tiny preset with 64 experts (top 2): its automatic chunk is 64·64/2 = 2048 tokens.
    let dir = temp_dir("many-experts");
    let m = s(&dir);
    ok(&run(&[
        "synth",
        "--preset",
        "tiny",
        "--experts",
        "64",
        "--out",
        &m,
        "--seed",
        "3",
    ]));
    let prompt = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    let ids: Vec<u32> =
        serde_json::from_str(&ok(&run(&["tokenize", "--tokenizer", &m, "--text", &prompt])).0)
            .unwrap();
    assert!(ids.len() > 600, "{} prompt tokens", ids.len());
    let context = (ids.len() + 2).to_string();
    let total = |chunk: Option<&str>| -> u64 {
        let mut args = vec!["plan", "--model", &m, "--context", &context, "--json"];
        if let Some(c) = chunk {
            args.extend(["--prefill-chunk", c]);
        }
        let v: Value = serde_json::from_str(&ok(&run(&args)).0).unwrap();
        if chunk.is_none() {
            assert_eq!(v["prefill_chunk"], 2048);
        }
        v["total_bytes"].as_u64().unwrap()
    };
    let (auto, small) = (total(None), total(Some("512")));
    assert!(auto > small, "{auto} against {small}");
    let budget = ((auto + small) / 2).to_string();
    let args = [
        "run",
        "--model",
        &m,
        "--prompt",
        &prompt,
        "-n",
        "2",
        "--ignore-eos",
        "--memory-budget",
        &budget,
    ];
    let (_, err) = ok(&run(&args));
    assert!(err.contains("note: prefill chunks of"), "{err}");
    assert!(err.contains("leaves no room for the 2048"), "{err}");
    let mut explicit = args.to_vec();
    explicit.extend(["--prefill-chunk", "2048"]);
    let out = run(&explicit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("with --prefill-chunk 512 it would fit"),
        "{err}"
    );
}
