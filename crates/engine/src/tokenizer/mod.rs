//! Text tokenization for Qwen models: encoding/decoding, the model's special tokens, its chat
//! template, streaming detokenization and stop strings.
//!
//! A [`TextTokenizer`] is built either from a Hugging Face model directory
//! ([`TextTokenizer::from_dir`]) or from GGUF metadata ([`TextTokenizer::from_gguf_metadata`]).
//! It is cheap to clone (shared internals).

mod chat;
mod gguf;
mod stop;
mod stream;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

pub use chat::{ChatMessage, ChatOptions, ChatTemplate, VALID_ROLES};
pub use gguf::QWEN2_SPLIT_REGEX;
pub use stop::{StopMatcher, StopOutcome};
pub use stream::IncrementalDecoder;

use crate::error::{EngineError, Result};

/// Tokens that end a turn / the text for Qwen models; always treated as EOS when present.
pub(crate) const QWEN_END_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// A tokenizer plus the model's special-token information and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<Arc<ChatTemplate>>,
    special_ids: Arc<HashSet<u32>>,
}

impl TextTokenizer {
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        eos_token_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<Arc<ChatTemplate>>,
    ) -> Self {
        let special_ids: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        TextTokenizer {
            inner: Arc::new(inner),
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
            special_ids: Arc::new(special_ids),
        }
    }

    /// Loads a Hugging Face model directory: `tokenizer.json` (required),
    /// `tokenizer_config.json` (`chat_template`, `eos_token`, `bos_token`; a template given
    /// as a list of `{name, template}` uses the one named `default`), `chat_template.jinja`
    /// (used when the config has no template) and `generation_config.json`
    /// (`eos_token_id`, a number or a list), each optional.
    ///
    /// EOS ids are the config's `eos_token`, generation_config's `eos_token_id`s and Qwen's
    /// `<|im_end|>` / `<|endoftext|>` when in the vocabulary, without duplicates.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| EngineError::load(&tok_path, e))?;

        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_opt(&dir.join("generation_config.json"))?;

        let cfg_token = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let bos_token = cfg_token("bos_token");
        let eos_token = cfg_token("eos_token");

        let mut eos_ids: Vec<u32> = Vec::new();
        let mut push_id = |id: u32| {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        };
        if let Some(t) = &eos_token {
            match tokenizer.token_to_id(t) {
                Some(id) => push_id(id),
                None => {
                    tracing::warn!(eos_token = %t, "eos_token of tokenizer_config.json is not in the vocabulary")
                }
            }
        }
        if let Some(v) = gen_config.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<&serde_json::Value> = match v {
                serde_json::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for id in ids {
                match id.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(id) => push_id(id),
                    None => {
                        return Err(EngineError::load(
                            dir.join("generation_config.json"),
                            format!("eos_token_id {id} is not a token id"),
                        ))
                    }
                }
            }
        }
        for t in QWEN_END_TOKENS {
            if let Some(id) = tokenizer.token_to_id(t) {
                push_id(id);
            }
        }

        let cfg_path = dir.join("tokenizer_config.json");
        let mut template_src: Option<String> =
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    let named = |name: &str| {
                        list.iter()
                            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
                    };
                    let entry = named("default").ok_or_else(|| {
                        EngineError::load(
                            &cfg_path,
                            "chat_template list has no entry named \"default\"",
                        )
                    })?;
                    let src = entry
                        .get("template")
                        .and_then(|t| t.as_str())
                        .ok_or_else(|| {
                            EngineError::load(
                                &cfg_path,
                                "default chat_template entry has no string `template`",
                            )
                        })?;
                    Some(src.to_owned())
                }
                Some(_) => {
                    return Err(EngineError::load(
                        &cfg_path,
                        "chat_template is neither a string nor a list",
                    ))
                }
            };
        if template_src.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let src = std::fs::read_to_string(&jinja).map_err(|source| EngineError::Io {
                    path: jinja.clone(),
                    source,
                })?;
                template_src = Some(src);
            }
        }
        let chat_template = match template_src {
            Some(src) => Some(Arc::new(ChatTemplate::new(
                src,
                bos_token.clone(),
                eos_token.clone(),
            )?)),
            None => None,
        };
        Ok(Self::from_parts(
            tokenizer,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        ))
    }

    /// Encodes `text`. Special tokens written in the text (e.g. `<|im_start|>`) map to their
    /// single ids. `add_special_tokens` runs the post-processor (Qwen's adds no BOS/EOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text; with `skip_special` special tokens are left out. Ids outside
    /// the vocabulary are ignored (as Hugging Face tokenizers does).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// The id of `token` (a vocabulary entry, e.g. `"<|im_end|>"` or `"Ġworld"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry for `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of distinct tokens known, added tokens included. The model's embedding matrix
    /// may be larger (padding rows without a token).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a special (control) token, e.g. `<|im_start|>`.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids that end generation (end of turn / end of text).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// The BOS token text, if the model defines one (exposed to the chat template).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token text, if the model defines one (exposed to the chat template).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The model's chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_deref()
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
    ) -> Result<String> {
        self.chat_template
            .as_deref()
            .ok_or_else(|| EngineError::Template("this model has no chat template".into()))?
            .render(messages, opts)
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A streaming detokenizer for one sequence.
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(self)
    }
}

/// GPT-2's byte → printable char table (`bytes_to_unicode`), used by byte-level BPE
/// vocabularies such as Qwen's: entry `b` is the character that stands for byte `b`.
pub(crate) fn byte_chars() -> Vec<char> {
    let mut direct: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    direct.extend(0xA1..=0xAC);
    direct.extend(0xAE..=0xFF);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if direct.contains(&b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

/// The raw bytes of every token id, for reporting logprobs (`token`, `bytes`) without running
/// the tokenizer: byte-level vocabulary entries are mapped back to their bytes, added tokens
/// (e.g. `<|im_end|>`) are their own text. Built once per model.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    bytes: std::sync::Arc<Vec<Box<[u8]>>>,
}

impl TokenTable {
    pub fn new(t: &TextTokenizer) -> Self {
        let inv: HashMap<char, u8> = byte_chars().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect();
        let added: HashMap<u32, String> =
            t.inner().get_added_tokens_decoder().into_iter().map(|(id, tok)| (id, tok.content)).collect();
        let n = t.vocab_size().max(added.keys().map(|&i| i as usize + 1).max().unwrap_or(0));
        let bytes = (0..n as u32)
            .map(|id| match added.get(&id) {
                Some(s) => s.as_bytes().into(),
                None => match t.id_to_token(id) {
                    Some(tok) if tok.chars().all(|c| inv.contains_key(&c)) => tok.chars().map(|c| inv[&c]).collect(),
                    Some(tok) => tok.into_bytes().into(),
                    None => Box::default(),
                },
            })
            .collect();
        TokenTable { bytes: std::sync::Arc::new(bytes) }
    }

    /// The bytes of token `id` (empty for ids outside the vocabulary).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// The token as text (invalid UTF-8, e.g. half a character, is replaced by U+FFFD).
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.bytes(id)).into_owned()
    }
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist.
fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EngineError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::load(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a tokenizer.json equivalent to the tiny GGUF tokenizer, plus configs.
    fn write_dir(dir: &Path, config: &str, gen_config: Option<&str>) {
        let t = gguf::tests::tiny();
        t.inner().save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        if let Some(g) = gen_config {
            std::fs::write(dir.join("generation_config.json"), g).unwrap();
        }
    }

    #[test]
    fn from_dir_reads_configs() {
        let d = tempfile::tempdir().unwrap();
        write_dir(
            d.path(),
            r#"{"eos_token": {"content": "<|endoftext|>"}, "bos_token": null,
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D{{ eos_token }}"}]}"#,
            Some(r#"{"eos_token_id": [268, 266, 269]}"#),
        );
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        assert_eq!(t.eos_token_ids(), &[266, 268, 269]);
        assert_eq!(t.bos_token(), None);
        assert_eq!(t.eos_token(), Some("<|endoftext|>"));
        assert_eq!(
            t.chat_template().map(|c| c.source()),
            Some("D{{ eos_token }}")
        );
        assert_eq!(
            t.apply_chat_template(&[], &ChatOptions::default()).unwrap(),
            "D<|endoftext|>"
        );
        assert_eq!(
            t.encode("<|im_start|>hello world", false).unwrap(),
            vec![267, 259, 264]
        );
        assert!(t.is_special(267) && !t.is_special(269));
    }

    #[test]
    fn from_dir_without_template_or_generation_config() {
        let d = tempfile::tempdir().unwrap();
        write_dir(d.path(), r#"{"eos_token": "<|im_end|>"}"#, None);
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        assert_eq!(t.eos_token_ids(), &[268, 266]);
        assert!(t.chat_template().is_none());
        assert!(matches!(
            t.apply_chat_template(&[ChatMessage::new("user", "x")], &ChatOptions::default()),
            Err(EngineError::Template(_))
        ));
        std::fs::write(
            d.path().join("chat_template.jinja"),
            "J{{ messages|length }}",
        )
        .unwrap();
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        assert_eq!(
            t.apply_chat_template(&[], &ChatOptions::default()).unwrap(),
            "J0"
        );
    }

    #[test]
    fn from_dir_errors() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            TextTokenizer::from_dir(d.path()),
            Err(EngineError::Load { .. })
        ));
        write_dir(d.path(), "{not json", None);
        assert!(matches!(
            TextTokenizer::from_dir(d.path()),
            Err(EngineError::Load { .. })
        ));
        write_dir(
            d.path(),
            r#"{"chat_template": [{"name": "x", "template": "T"}]}"#,
            None,
        );
        assert!(matches!(
            TextTokenizer::from_dir(d.path()),
            Err(EngineError::Load { .. })
        ));
    }
}
