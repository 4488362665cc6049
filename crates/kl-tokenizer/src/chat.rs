//! Rendering a chat template the way Hugging Face transformers does.
//!
//! transformers compiles the template in a Jinja2 `ImmutableSandboxedEnvironment`
//! with `trim_blocks=True`, `lstrip_blocks=True` and the `loopcontrols`
//! extension, swaps in a `tojson` filter that is Python's `json.dumps`
//! (`ensure_ascii=False`, keyword arguments allowed), and renders with
//! `messages`, `tools`, `documents`, `add_generation_prompt` and the special
//! token names (`bos_token`, `eos_token`, ...). Kimi's `apply_chat_template`
//! first sorts the keys of `tools` recursively (`deep_sort_dict`).
//!
//! This module reproduces that with `minijinja`: the same whitespace
//! control, no auto-escaping, the trailing newline dropped, Python's
//! `json.dumps` for `tojson`, Python `repr`-style printing of `None`,
//! booleans, lists and dicts, and the Python methods templates commonly
//! call on dicts and strings (`.get()`, `.items()`, `.startswith()`, ...),
//! which minijinja does not have natively.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};

use crate::error::TokenizerError;
use crate::pyjson::{dumps, py_repr, DumpOptions};

/// Everything a render needs besides the template source.
pub(crate) struct ChatInput<'a> {
    /// The conversation: a JSON array of message objects.
    pub(crate) messages: &'a serde_json::Value,
    /// Tool schemas (a JSON array), if any.
    pub(crate) tools: Option<&'a serde_json::Value>,
    /// Append the assistant-turn opener.
    pub(crate) add_generation_prompt: bool,
    /// Extra variables: special-token names from `tokenizer_config.json`.
    pub(crate) extra: &'a serde_json::Map<String, serde_json::Value>,
}

/// Renders `source` (named `name` in error messages) with `input`.
pub(crate) fn render(
    source: &str,
    name: &str,
    input: &ChatInput<'_>,
) -> Result<String, TokenizerError> {
    let messages = match input.messages {
        serde_json::Value::Array(items) => {
            if let Some(pos) = items.iter().position(|m| !m.is_object()) {
                return Err(TokenizerError::ChatArgument {
                    arg: "messages",
                    reason: format!("item {pos} is not an object"),
                });
            }
            Value::from_serialize(input.messages)
        }
        other => {
            return Err(TokenizerError::ChatArgument {
                arg: "messages",
                reason: format!(
                    "expected an array of message objects, got {}",
                    json_kind(other)
                ),
            })
        }
    };
    let tools = match input.tools {
        None | Some(serde_json::Value::Null) => Value::from(()),
        Some(t @ serde_json::Value::Array(_)) => Value::from_serialize(deep_sort(t)),
        Some(other) => {
            return Err(TokenizerError::ChatArgument {
                arg: "tools",
                reason: format!(
                    "expected an array of tool objects, got {}",
                    json_kind(other)
                ),
            })
        }
    };

    let env = environment();
    let template_err = |e: Error| TokenizerError::Template {
        name: name.to_string(),
        reason: describe(&e),
    };
    let template = env.template_from_str(source).map_err(template_err)?;
    let mut ctx: Vec<(String, Value)> = input
        .extra
        .iter()
        .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
        .collect();
    ctx.push(("messages".into(), messages));
    ctx.push(("tools".into(), tools));
    ctx.push(("documents".into(), Value::from(())));
    ctx.push((
        "add_generation_prompt".into(),
        Value::from(input.add_generation_prompt),
    ));
    let ctx: Value = ctx.into_iter().collect();
    template.render(ctx).map_err(template_err)
}

/// A minijinja environment configured like transformers' Jinja environment.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.set_unknown_method_callback(py_method);
    env.set_formatter(|out, _state, value| {
        let text = match value.kind() {
            ValueKind::Undefined => return Ok(()),
            ValueKind::None => "None".to_string(),
            ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_string(),
            ValueKind::Seq | ValueKind::Map | ValueKind::Number => {
                let mut s = String::new();
                py_repr(value, &mut s);
                s
            }
            _ => value.to_string(),
        };
        out.write_str(&text)
            .map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"))
    });
    env
}

/// The error with its cause chain and template line.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A JSON value's kind as an error message names it: "null", "a boolean", "a number",
/// "a string", "an array" or "an object".
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Kimi's `deep_sort_dict`: object keys sorted at every depth, lists kept in
/// order but sorted inside.
pub(crate) fn deep_sort(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            keys.into_iter()
                .map(|k| (k.clone(), deep_sort(&map[k])))
                .collect()
        }
        serde_json::Value::Array(items) => items.iter().map(deep_sort).collect(),
        other => other.clone(),
    }
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, all four overridable by keyword.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let mut opts = DumpOptions::default();
    if let Some(v) = kwargs.get::<Option<Value>>("ensure_ascii")? {
        opts.ensure_ascii = v.is_true();
    }
    if let Some(v) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = v;
    }
    if let Some(v) = kwargs.get::<Option<Value>>("indent")? {
        match v.kind() {
            ValueKind::None => {}
            ValueKind::String => opts.indent = Some(v.as_str().unwrap_or_default().to_string()),
            ValueKind::Number => {
                let n = v.as_i64().ok_or_else(|| bad("indent must be an integer"))?;
                opts.indent = Some(" ".repeat(n.clamp(0, 1 << 16) as usize));
            }
            _ => return Err(bad("indent must be None, an integer or a string")),
        }
        if opts.indent.is_some() {
            opts.item_sep = ",".into();
        }
    }
    if let Some(v) = kwargs.get::<Option<Value>>("separators")? {
        if !v.is_none() {
            let parts: Vec<Value> = v
                .try_iter()
                .map_err(|_| bad("separators must be a pair"))?
                .collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    opts.item_sep = a.as_str().unwrap_or_default().to_string();
                    opts.key_sep = b.as_str().unwrap_or_default().to_string();
                }
                _ => return Err(bad("separators must be a pair of strings")),
            }
        }
    }
    kwargs.assert_all_used()?;
    dumps(value, &opts)
}

/// HF's `raise_exception(message)` global.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn arg(args: &[Value], i: usize) -> Option<&Value> {
    args.get(i).filter(|v| !v.is_none() && !v.is_undefined())
}

fn str_arg(args: &[Value], i: usize, method: &str) -> Result<Option<String>, Error> {
    match arg(args, i) {
        None => Ok(None),
        Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("{method}() argument must be a string"),
            )
        }),
    }
}

/// Python methods on dicts and strings that templates call.
fn py_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match (value.kind(), method) {
        (ValueKind::Map, "get") => {
            let key = args.first().cloned().unwrap_or_default();
            let found = value.get_item(&key)?;
            Ok(if found.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        (ValueKind::Map, "items") => Ok(value
            .try_iter()?
            .map(|k| {
                let v = value.get_item(&k).unwrap_or_default();
                Value::from(vec![k, v])
            })
            .collect()),
        (ValueKind::Map, "keys") => Ok(value.try_iter()?.collect()),
        (ValueKind::Map, "values") => Ok(value
            .try_iter()?
            .map(|k| value.get_item(&k).unwrap_or_default())
            .collect()),
        (ValueKind::String, _) => str_method(value.as_str().unwrap_or_default(), method, args),
        _ => Err(Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        )),
    }
}

fn str_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let affixes = |i: usize| -> Result<Vec<String>, Error> {
        match arg(args, i) {
            Some(v) if v.kind() == ValueKind::Seq => Ok(v
                .try_iter()?
                .filter_map(|x| x.as_str().map(String::from))
                .collect()),
            _ => Ok(str_arg(args, i, method)?.into_iter().collect()),
        }
    };
    let strip_set = if method.ends_with("strip") {
        str_arg(args, 0, method)?
    } else {
        None
    };
    let in_set = |c: char| match &strip_set {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    Ok(match method {
        "startswith" => Value::from(affixes(0)?.iter().any(|p| s.starts_with(p.as_str()))),
        "endswith" => Value::from(affixes(0)?.iter().any(|p| s.ends_with(p.as_str()))),
        "strip" => Value::from(s.trim_matches(in_set)),
        "lstrip" => Value::from(s.trim_start_matches(in_set)),
        "rstrip" => Value::from(s.trim_end_matches(in_set)),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "split" => {
            let max = arg(args, 1).and_then(Value::as_i64).unwrap_or(-1);
            let limit = if max < 0 {
                usize::MAX
            } else {
                max as usize + 1
            };
            let parts: Vec<Value> = match str_arg(args, 0, method)? {
                Some(sep) if sep.is_empty() => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "split(): empty separator",
                    ))
                }
                Some(sep) => s.splitn(limit, sep.as_str()).map(Value::from).collect(),
                None => split_whitespace(s, limit),
            };
            Value::from(parts)
        }
        "replace" => {
            let old = str_arg(args, 0, method)?.unwrap_or_default();
            let new = str_arg(args, 1, method)?.unwrap_or_default();
            match arg(args, 2).and_then(Value::as_i64) {
                Some(n) if n >= 0 => Value::from(s.replacen(old.as_str(), &new, n as usize)),
                _ => Value::from(s.replace(old.as_str(), &new)),
            }
        }
        _ => {
            return Err(Error::new(
                ErrorKind::UnknownMethod,
                format!("string has no method named {method}"),
            ))
        }
    })
}

/// Python's `str.split()` without a separator, at most `limit` parts.
fn split_whitespace(s: &str, limit: usize) -> Vec<Value> {
    let mut parts = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if parts.len() + 1 == limit {
            parts.push(Value::from(rest));
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        parts.push(Value::from(&rest[..end]));
        rest = rest[end..].trim_start();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(src: &str, messages: serde_json::Value) -> Result<String, TokenizerError> {
        let extra = serde_json::Map::new();
        let input = ChatInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: false,
            extra: &extra,
        };
        render(src, "test", &input)
    }

    #[test]
    fn python_flavoured_output() {
        let msgs = serde_json::json!([{"role": "user", "content": "a b  c", "x": null}]);
        let out = render_str(
            "{{ messages[0].get('x') }} {{ messages[0].get('y', 1) }} {{ true }} \
             {{ messages[0].content.split() }} {{ messages[0].role.startswith(('u', 'v')) }} \
             {{ 1e16 }} {{ 2.0 }} {{ 7 }} \
             {% for k, v in messages[0].items() %}{{ k }}{% endfor %} {{ [1, 'a'] }}",
            msgs,
        )
        .unwrap();
        assert_eq!(
            out,
            "None 1 True ['a', 'b', 'c'] True 1e+16 2.0 7 rolecontentx [1, 'a']"
        );
    }

    #[test]
    fn errors_are_reported() {
        let e = render_str("{% if %}", serde_json::json!([])).unwrap_err();
        assert!(matches!(e, TokenizerError::Template { .. }), "{e}");
        let e = render_str("{{ raise_exception('boom') }}", serde_json::json!([])).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let e = render_str("", serde_json::json!({"role": "user"})).unwrap_err();
        assert!(e.to_string().contains("messages"), "{e}");
    }

    #[test]
    fn deep_sort_sorts_nested_keys() {
        let v = serde_json::json!([{"b": {"z": 1, "a": [{"y": 0, "x": 0}]}, "a": 0}]);
        assert_eq!(
            serde_json::to_string(&deep_sort(&v)).unwrap(),
            r#"[{"a":0,"b":{"a":[{"x":0,"y":0}],"z":1}}]"#
        );
    }
}
