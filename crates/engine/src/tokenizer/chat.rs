//! Chat templates: renders the model's own Jinja chat template with minijinja, configured to
//! behave like Hugging Face `transformers` (`apply_chat_template`): `trim_blocks` and
//! `lstrip_blocks` on, Python string/dict methods (`.startswith`, `.strip`, `.split`, `.items`,
//! ...) through `minijinja_contrib::pycompat`, a `raise_exception` function, and a `tojson`
//! filter that matches Python's `json.dumps(x, ensure_ascii=False)` (separators `", "` and
//! `": "`, no HTML escaping, key order preserved).

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Name under which the template is stored in the minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Roles accepted in a conversation.
pub const VALID_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Template variables that are set by the renderer itself and may not be overridden through
/// [`ChatOptions::extra`].
const RESERVED_VARS: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// One message of a conversation, in the OpenAI chat-completions shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text content. `None` (e.g. an assistant turn that only calls tools) renders as `""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Reasoning ("thinking") text of an earlier assistant turn (Qwen3 templates use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool calls made by an assistant turn, OpenAI shape
    /// `{"id", "type": "function", "function": {"name", "arguments"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// For `tool` messages: the id of the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Optional participant / tool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and text content and no other fields.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            ..Default::default()
        }
    }
}

/// Options for rendering a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatOptions {
    /// Append the opening of an assistant turn (`<|im_start|>assistant\n` for Qwen).
    pub add_generation_prompt: bool,
    /// Tool (function) definitions, OpenAI shape; passed to the template as `tools`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Extra top-level template variables (`chat_template_kwargs`), e.g. Qwen3's
    /// `enable_thinking`. May not override `messages`, `tools` or `add_generation_prompt`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are exposed to the template as the
    /// variables of the same names (undefined when `None`).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| EngineError::Template(format!("cannot compile: {}", error_chain(&e))))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The template source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into the prompt string.
    ///
    /// Messages are validated (roles must be one of [`VALID_ROLES`]) and normalised the way
    /// vLLM does before rendering: absent fields are left undefined, a missing `content`
    /// becomes `""`, and tool-call `function.arguments` given as a JSON string (OpenAI wire
    /// format) is parsed into an object, because Qwen2.5's template applies `tojson` to it.
    pub fn render(&self, messages: &[ChatMessage], opts: &ChatOptions) -> Result<String> {
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            msgs.push(message_to_template_value(i, m)?);
        }
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::from(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::from(eos.clone()));
        }
        for (k, v) in &opts.extra {
            if RESERVED_VARS.contains(&k.as_str()) {
                return Err(EngineError::invalid(
                    "chat_template_kwargs",
                    format!("`{k}` is set by the server and cannot be overridden"),
                ));
            }
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(&msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        let tools = match &opts.tools {
            Some(t) => Value::from_serialize(t),
            None => Value::from(()),
        };
        ctx.insert("tools".into(), tools);

        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(error_chain(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| EngineError::Template(error_chain(&e)))
    }
}

/// Formats a minijinja error and its sources on one line.
fn error_chain(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Validates one message and turns it into the JSON the template sees.
fn message_to_template_value(i: usize, m: &ChatMessage) -> Result<serde_json::Value> {
    if !VALID_ROLES.contains(&m.role.as_str()) {
        return Err(EngineError::InvalidParam {
            field: "messages[].role",
            msg: format!(
                "messages[{i}].role is {:?}; expected one of system, user, assistant, tool",
                m.role
            ),
        });
    }
    let mut obj = serde_json::Map::new();
    obj.insert("role".into(), m.role.clone().into());
    obj.insert(
        "content".into(),
        m.content.clone().unwrap_or_default().into(),
    );
    if let Some(r) = &m.reasoning_content {
        obj.insert("reasoning_content".into(), r.clone().into());
    }
    if let Some(calls) = &m.tool_calls {
        let calls: Vec<serde_json::Value> = calls.iter().map(normalize_tool_call).collect();
        obj.insert("tool_calls".into(), serde_json::Value::Array(calls));
    }
    if let Some(id) = &m.tool_call_id {
        obj.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(n) = &m.name {
        obj.insert("name".into(), n.clone().into());
    }
    Ok(serde_json::Value::Object(obj))
}

/// Parses `function.arguments` (and a bare `arguments`) from a JSON string into a value when
/// the string is valid JSON; leaves it unchanged otherwise.
fn normalize_tool_call(call: &serde_json::Value) -> serde_json::Value {
    let mut call = call.clone();
    fn parse_args(obj: &mut serde_json::Value) {
        if let Some(args) = obj.get_mut("arguments") {
            if let Some(s) = args.as_str() {
                if let Ok(parsed) = serde_json::from_str::<serde_json::Value>(s) {
                    *args = parsed;
                }
            }
        }
    }
    if let Some(f) = call.get_mut("function") {
        parse_args(f);
    }
    parse_args(&mut call);
    call
}

/// `raise_exception(msg)`: aborts rendering with `msg` as the error.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// serde_json formatter with Python `json.dumps` default separators (`", "`, `": "`).
struct PythonCompactFormatter;

impl serde_json::ser::Formatter for PythonCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` filter matching transformers' override:
/// `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = Vec::<u8>::new();
    let res = match indent {
        Some(n) => {
            let ind = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(value, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonCompactFormatter);
            serde::Serialize::serialize(value, &mut ser)
        }
    };
    res.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    let s = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson produced invalid UTF-8")
            .with_source(e)
    })?;
    Ok(Value::from_safe_string(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, msgs: &[ChatMessage], opts: &ChatOptions) -> Result<String> {
        ChatTemplate::new(src, None, Some("<|im_end|>".into()))?.render(msgs, opts)
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let opts = ChatOptions {
            tools: Some(vec![
                json!({"z": 1, "a": [1, 2.5, "ü<&>'"], "n": null, "t": true}),
            ]),
            ..Default::default()
        };
        let out = render("{{ tools[0] | tojson }}", &[], &opts).unwrap();
        // Python: json.dumps({...}, ensure_ascii=False); key order preserved.
        assert_eq!(
            out,
            r#"{"z": 1, "a": [1, 2.5, "ü<&>'"], "n": null, "t": true}"#
        );
        let out = render("{{ tools[0] | tojson(indent=2) }}", &[], &opts).unwrap();
        assert_eq!(
            out,
            "{\n  \"z\": 1,\n  \"a\": [\n    1,\n    2.5,\n    \"ü<&>'\"\n  ],\n  \"n\": null,\n  \"t\": true\n}"
        );
    }

    #[test]
    fn python_methods_namespace_and_slicing() {
        let src = "{%- set ns = namespace(n=0) %}\
                   {%- for m in messages[::-1] %}{%- set ns.n = ns.n + 1 %}\
                   {{- loop.index0 }}:{{ m.role }}:{{ m.content.strip().split(' ')[-1] }}\
                   {{- '|' if m.content.startswith(' hi') else ';' }}{%- endfor %}{{ ns.n }}";
        let msgs = vec![
            ChatMessage::new("user", " hi there "),
            ChatMessage::new("assistant", "a b"),
        ];
        let out = render(src, &msgs, &ChatOptions::default()).unwrap();
        assert_eq!(out, "0:assistant:b;1:user:there|2");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let err = render(
            src,
            &[ChatMessage::new("system", "x")],
            &ChatOptions::default(),
        )
        .unwrap_err();
        match err {
            EngineError::Template(m) => assert!(m.contains("first must be user"), "{m}"),
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(
            render(
                src,
                &[ChatMessage::new("user", "x")],
                &ChatOptions::default()
            )
            .unwrap(),
            "ok"
        );
    }

    #[test]
    fn invalid_role_names_the_message() {
        let msgs = vec![
            ChatMessage::new("user", "a"),
            ChatMessage::new("robot", "b"),
        ];
        let err = render("x", &msgs, &ChatOptions::default()).unwrap_err();
        match err {
            EngineError::InvalidParam { msg, .. } => {
                assert!(msg.contains("messages[1].role"), "{msg}")
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        let msgs = vec![ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(
            render(src, &msgs, &ChatOptions::default()).unwrap(),
            "[a]\n[b]\n"
        );
    }

    #[test]
    fn extra_kwargs_bos_eos_and_undefined_fields() {
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), json!(false));
        let opts = ChatOptions {
            add_generation_prompt: true,
            tools: None,
            extra,
        };
        let src = "{{ eos_token }}|{{ bos_token is defined }}|{{ enable_thinking is false }}|\
                   {{ add_generation_prompt }}|{{ messages[0].reasoning_content is defined }}|\
                   {{ messages[0].content == '' }}|{{ tools is none }}";
        let msg = ChatMessage {
            role: "assistant".into(),
            ..Default::default()
        };
        assert_eq!(
            render(src, &[msg], &opts).unwrap(),
            "<|im_end|>|False|True|True|False|True|True"
        );

        let mut bad = serde_json::Map::new();
        bad.insert("messages".into(), json!([]));
        let opts = ChatOptions {
            extra: bad,
            ..Default::default()
        };
        assert!(matches!(
            render("x", &[], &opts),
            Err(EngineError::InvalidParam {
                field: "chat_template_kwargs",
                ..
            })
        ));
    }

    #[test]
    fn tool_call_arguments_string_is_parsed() {
        let msg = ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(vec![json!({"type": "function",
                "function": {"name": "f", "arguments": "{\"b\":1,\"a\":\"x\"}"}})]),
            ..Default::default()
        };
        let src = "{{ messages[0].tool_calls[0].function.arguments | tojson }}";
        assert_eq!(
            render(src, &[msg], &ChatOptions::default()).unwrap(),
            r#"{"b": 1, "a": "x"}"#
        );
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        assert!(matches!(
            ChatTemplate::new("{% if %}", None, None),
            Err(EngineError::Template(_))
        ));
    }
}
