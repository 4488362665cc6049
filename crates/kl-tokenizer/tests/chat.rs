//! Chat template: every fixture case, rendered string and ids.

mod common;

use common::{cases, expected, ids, read_fixture, tokenizer};
use kl_tokenizer::{Tokenizer, TokenizerError};

#[test]
fn chat_cases_render_and_encode() {
    let tok = tokenizer();
    assert_eq!(
        tok.chat_template(),
        Some(read_fixture("chat_template.jinja").as_str())
    );
    let exp = expected();
    for (name, case) in cases(&exp, "chat_cases") {
        let tools = case.get("tools").filter(|t| !t.is_null());
        let gen = case["add_generation_prompt"]
            .as_bool()
            .expect("add_generation_prompt");
        let rendered = tok
            .apply_chat_template(&case["messages"], tools, gen)
            .unwrap_or_else(|e| panic!("case {name}: {e}"));
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "case {name}: rendered"
        );
        assert_eq!(
            tok.encode(&rendered, true),
            ids(&case["ids"]),
            "case {name}: ids"
        );
    }
}

#[test]
fn template_from_config_field_and_from_parts() {
    let model = read_fixture("tiktoken.model");
    let config = read_fixture("tokenizer_config.json");
    let template = read_fixture("chat_template.jinja");
    let exp = expected();
    let (_, case) = cases(&exp, "chat_cases")[0];
    let want = case["rendered"].as_str().unwrap();

    let tok = Tokenizer::from_parts(&model, &config, Some(template.clone())).unwrap();
    let got = tok
        .apply_chat_template(&case["messages"], None, true)
        .unwrap();
    assert_eq!(got, want);

    // No template given: the config's `chat_template` field is used.
    let mut cfg: serde_json::Value = serde_json::from_str(&config).unwrap();
    cfg["chat_template"] = serde_json::Value::String(template);
    let tok = Tokenizer::from_parts(&model, &cfg.to_string(), None).unwrap();
    assert_eq!(
        tok.apply_chat_template(&case["messages"], None, true)
            .unwrap(),
        want
    );

    // Neither: a clear error.
    let tok = Tokenizer::from_parts(&model, &config, None).unwrap();
    assert!(tok.chat_template().is_none());
    let err = tok
        .apply_chat_template(&case["messages"], None, true)
        .unwrap_err();
    assert!(matches!(err, TokenizerError::NoChatTemplate), "{err}");
}

#[test]
fn template_errors_are_errors() {
    let model = read_fixture("tiktoken.model");
    let config = read_fixture("tokenizer_config.json");
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);

    let tok = Tokenizer::from_parts(&model, &config, Some("{% for x in %}".into())).unwrap();
    let err = tok.apply_chat_template(&msgs, None, false).unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }), "{err}");

    let tok = tokenizer();
    let err = tok
        .apply_chat_template(&serde_json::json!("hello"), None, false)
        .unwrap_err();
    assert!(err.to_string().contains("messages"), "{err}");
    let err = tok
        .apply_chat_template(&msgs, Some(&serde_json::json!({"a": 1})), false)
        .unwrap_err();
    assert!(err.to_string().contains("tools"), "{err}");
}

#[test]
fn special_token_variables_and_tojson_options() {
    let model = read_fixture("tiktoken.model");
    let config = read_fixture("tokenizer_config.json");
    let src = "{{ bos_token }}|{{ eos_token }}|{{ additional_special_tokens[0] }}|\
               {{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1, sort_keys=true) }}";
    let tok = Tokenizer::from_parts(&model, &config, Some(src.into())).unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "é", "n": 1.0}]);
    let out = tok.apply_chat_template(&msgs, None, false).unwrap();
    assert_eq!(
        out,
        "[BOS]|[EOS]|<|im_end|>|{\"role\": \"user\", \"content\": \"é\", \"n\": 1.0}|\
         {\n \"content\": \"é\",\n \"n\": 1.0,\n \"role\": \"user\"\n}"
    );
}
