//! Qwen tool calls in generated text → OpenAI `tool_calls`.
//!
//! Qwen2.5/Qwen3 emit `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (several in a
//! row for parallel calls). Small models often emit the bare object (or a list of them)
//! instead; with tools offered, a whole reply that is such JSON is taken as calls too. Text that
//! does not parse stays content: nothing the model wrote is dropped.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub arguments: String,
}

/// A `{"name": …, "arguments"|"parameters": …}` object as a call.
fn call_of(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = o.get("arguments").or_else(|| o.get("parameters")).cloned().unwrap_or(Value::Object(Default::default()));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// Calls in a bare JSON reply: one object or a list of objects.
fn bare_calls(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let t = t.strip_prefix("```json").or_else(|| t.strip_prefix("```")).map(|s| s.trim_end().trim_end_matches("```").trim()).unwrap_or(t);
    let v: Value = serde_json::from_str(t).ok()?;
    match &v {
        Value::Object(_) => call_of(&v).map(|c| vec![c]),
        Value::Array(items) if !items.is_empty() => items.iter().map(call_of).collect(),
        _ => None,
    }
}

/// Split a finished reply into content and tool calls.
pub fn parse(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let (body, next, closed) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..], true),
            None => (after, "", false),
        };
        match serde_json::from_str::<Value>(body.trim()).ok().as_ref().and_then(call_of) {
            Some(c) => {
                content.push_str(&rest[..start]);
                calls.push(c);
            }
            None => {
                // Not a call after all: keep the text as the model wrote it.
                let end = rest.len() - next.len();
                content.push_str(&rest[..end]);
                let _ = closed;
            }
        }
        rest = next;
    }
    content.push_str(rest);
    if calls.is_empty() {
        if let Some(c) = bare_calls(&content) {
            return (None, c);
        }
    }
    let content = content.trim();
    (if content.is_empty() { None } else { Some(content.to_string()) }, calls)
}

/// Streams content while holding back what may become a tool call: from `<tool_call>` on (or
/// a partial `<tool_call` at the end), and a reply that starts with `{`/`[` (a possible bare
/// call) until it ends.
#[derive(Debug, Default)]
pub struct ToolStream {
    held: String,
    /// Everything from here on is held until the end.
    holding_all: bool,
    started: bool,
}

impl ToolStream {
    /// Feed a text delta; returns the content that can be sent now.
    pub fn push(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        if self.holding_all {
            return String::new();
        }
        if !self.started {
            let t = self.held.trim_start();
            if t.is_empty() {
                return String::new();
            }
            self.started = true;
            if t.starts_with('{') || t.starts_with('[') || t.starts_with("```") {
                self.holding_all = true;
                return String::new();
            }
        }
        if let Some(i) = self.held.find(OPEN) {
            self.holding_all = true;
            let out = self.held[..i].to_string();
            self.held.drain(..i);
            return out;
        }
        // Hold back a suffix that could be the start of `<tool_call>`.
        let keep = (1..OPEN.len()).rev().find(|&k| self.held.len() >= k && self.held.is_char_boundary(self.held.len() - k) && OPEN.starts_with(&self.held[self.held.len() - k..])).unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// At the end: the remaining content and the calls.
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let held = std::mem::take(&mut self.held);
        if !self.holding_all {
            return (held, Vec::new());
        }
        let (content, calls) = parse(&held);
        if calls.is_empty() {
            return (held, calls);
        }
        (content.unwrap_or_default(), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_calls_and_content() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        let (c, calls) = parse(t);
        assert_eq!(c.as_deref(), Some("Let me check."));
        assert_eq!(calls, vec![
            ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() },
            ToolCall { name: "b".into(), arguments: "{}".into() },
        ]);
    }

    #[test]
    fn bare_object_and_unterminated_and_broken() {
        let (c, calls) = parse("{\"name\": \"f\", \"arguments\": {\"x\": 1}}");
        assert_eq!((c, calls.len(), calls[0].arguments.as_str()), (None, 1, "{\"x\":1}"));
        let (_, calls) = parse("<tool_call>\n{\"name\": \"f\", \"parameters\": {\"x\": 2}}");
        assert_eq!(calls[0].arguments, "{\"x\":2}");
        let (c, calls) = parse("<tool_call>not json</tool_call> ok");
        assert!(calls.is_empty());
        assert_eq!(c.as_deref(), Some("<tool_call>not json</tool_call> ok"));
        let (c, calls) = parse("{\"answer\": 42}");
        assert!(calls.is_empty());
        assert_eq!(c.as_deref(), Some("{\"answer\": 42}"));
    }

    #[test]
    fn stream_holds_back_calls_only() {
        let mut s = ToolStream::default();
        let mut out = String::new();
        for d in ["Hello", " wor", "ld <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"] {
            out.push_str(&s.push(d));
        }
        assert_eq!(out, "Hello world ");
        let (rest, calls) = s.finish();
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        let mut s = ToolStream::default();
        assert_eq!(s.push("a <"), "a ");
        assert_eq!(s.push("b"), "<b");
        assert_eq!(s.finish(), (String::new(), vec![]));
        let mut s = ToolStream::default();
        assert_eq!(s.push("{\"name\": \"f\", \"arguments\": {}}"), "");
        let (rest, calls) = s.finish();
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        let mut s = ToolStream::default();
        assert_eq!(s.push("{\"x\": 1}"), "");
        assert_eq!(s.finish(), ("{\"x\": 1}".to_string(), vec![]));
    }
}
