//! Building a [`TextTokenizer`] from GGUF metadata (`tokenizer.ggml.*` keys).
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with Qwen2's pre-tokenizer
//! (`tokenizer.ggml.pre == "qwen2"`) is supported; the result is equivalent to Qwen's
//! `tokenizer.json`: NFC normalizer, Qwen2 split regex + ByteLevel pre-tokenizer, BPE model,
//! ByteLevel decoder, no BOS added.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{ChatTemplate, TextTokenizer, QWEN_END_TOKENS};
use crate::error::{EngineError, Result};

/// Qwen2 / Qwen2.5 / Qwen3 pre-tokenizer split regex (from Qwen's tokenizer.json).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_UNUSED: i64 = 5;

fn tok_err(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| tok_err(format!("GGUF metadata lacks `{key}`")))
}

fn as_str<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.to_string()
        .map(|s| s.as_str())
        .map_err(|_| tok_err(format!("GGUF metadata `{key}` is not a string")))
}

fn as_int(v: &Value, key: &str) -> Result<i64> {
    let n = match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x)
            .map_err(|_| tok_err(format!("GGUF metadata `{key}` is out of range")))?,
        Value::I64(x) => *x,
        _ => return Err(tok_err(format!("GGUF metadata `{key}` is not an integer"))),
    };
    Ok(n)
}

fn as_array<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    v.to_vec()
        .map_err(|_| tok_err(format!("GGUF metadata `{key}` is not an array")))
}

fn opt_token_id(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = as_int(v, key)?;
            u32::try_from(n)
                .map(Some)
                .map_err(|_| tok_err(format!("GGUF metadata `{key}` = {n} is not a token id")))
        }
    }
}

impl TextTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata map (as read by
    /// `candle_core::quantized::gguf_file::Content::read`).
    ///
    /// Uses `tokenizer.ggml.{model,pre,tokens,token_type,merges,eos_token_id,bos_token_id}`
    /// and `tokenizer.chat_template`. Control tokens (type 3) become special added tokens,
    /// user-defined tokens (type 4) non-special added tokens; unused entries (type 5, the
    /// `[PAD…]` padding of the embedding matrix) are left out of the vocabulary.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = as_str(get(md, "tokenizer.ggml.model")?, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(EngineError::Unsupported(format!(
                "GGUF tokenizer model `{model}`: only byte-level BPE (`gpt2`) is supported"
            )));
        }
        match md.get("tokenizer.ggml.pre") {
            None => tracing::warn!("GGUF metadata lacks `tokenizer.ggml.pre`; assuming qwen2"),
            Some(v) => {
                let pre = as_str(v, "tokenizer.ggml.pre")?;
                if pre != "qwen2" {
                    return Err(EngineError::Unsupported(format!(
                        "GGUF pre-tokenizer `{pre}`: only `qwen2` is supported"
                    )));
                }
            }
        }

        let tokens_v = as_array(get(md, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let mut tokens = Vec::with_capacity(tokens_v.len());
        for v in tokens_v {
            tokens.push(as_str(v, "tokenizer.ggml.tokens[]")?);
        }
        if tokens.is_empty() {
            return Err(tok_err("GGUF `tokenizer.ggml.tokens` is empty"));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(tok_err("GGUF `tokenizer.ggml.tokens` is too large"));
        }
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(v) => {
                let arr = as_array(v, "tokenizer.ggml.token_type")?;
                let mut out = Vec::with_capacity(arr.len());
                for x in arr {
                    out.push(as_int(x, "tokenizer.ggml.token_type[]")?);
                }
                out
            }
        };
        if types.len() != tokens.len() {
            return Err(tok_err(format!(
                "GGUF has {} tokens but {} token types",
                tokens.len(),
                types.len()
            )));
        }

        let merges_v = as_array(get(md, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
        let mut merges = Vec::with_capacity(merges_v.len());
        for (i, v) in merges_v.iter().enumerate() {
            let m = as_str(v, "tokenizer.ggml.merges[]")?;
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                tok_err(format!("GGUF merge #{i} {m:?} is not of the form \"a b\""))
            })?;
            merges.push((a.to_owned(), b.to_owned()));
        }

        let mut vocab = Vocab::default();
        let mut added: Vec<(u32, AddedToken)> = Vec::new();
        for (i, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            // Cannot truncate: tokens.len() fits in u32 (checked above).
            let id = i as u32;
            if ty == TOKEN_TYPE_UNUSED {
                continue;
            }
            if vocab.contains_key(tok) {
                tracing::warn!(
                    id,
                    token = tok,
                    "duplicate GGUF token; keeping the first id"
                );
                continue;
            }
            vocab.insert(tok.to_owned(), id);
            match ty {
                TOKEN_TYPE_CONTROL => added.push((id, AddedToken::from(tok, true))),
                TOKEN_TYPE_USER_DEFINED => {
                    added.push((id, AddedToken::from(tok, false).normalized(false)))
                }
                _ => {}
            }
        }

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(format!("cannot build BPE model from GGUF: {e}")))?;
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(format!("cannot compile pre-tokenizer regex: {e}")))?;
        let byte_level = ByteLevel::new(false, false, false);
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(NFC))
            .with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));
        let added_tokens: Vec<AddedToken> = added.iter().map(|(_, t)| t.clone()).collect();
        tokenizer.add_tokens(&added_tokens);
        for (id, t) in &added {
            let got = tokenizer.token_to_id(&t.content);
            if got != Some(*id) {
                return Err(tok_err(format!(
                    "added token {:?} got id {got:?}, GGUF says {id}",
                    t.content
                )));
            }
        }

        let token_text = |id: u32| tokens.get(id as usize).map(|s| (*s).to_owned());
        let eos_id = opt_token_id(md, "tokenizer.ggml.eos_token_id")?;
        let bos_id = opt_token_id(md, "tokenizer.ggml.bos_token_id")?;
        let eos_token = eos_id.and_then(token_text);
        let bos_token = bos_id.and_then(token_text);

        let mut eos_ids: Vec<u32> = Vec::new();
        if let Some(id) = eos_id {
            if token_text(id).is_none() {
                return Err(tok_err(format!(
                    "GGUF eos_token_id {id} is outside the vocabulary"
                )));
            }
            eos_ids.push(id);
        }
        for t in QWEN_END_TOKENS {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }

        let chat_template = match md.get("tokenizer.chat_template") {
            None => None,
            Some(v) => {
                let src = as_str(v, "tokenizer.chat_template")?;
                Some(Arc::new(ChatTemplate::new(
                    src,
                    bos_token.clone(),
                    eos_token.clone(),
                )?))
            }
        };
        Ok(TextTokenizer::from_parts(
            tokenizer,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::tokenizer::byte_chars;

    /// A tiny Qwen-like GGUF tokenizer: the 256 byte tokens, a few merges, 4 added tokens and
    /// one unused pad entry.
    /// Ids: 0..=255 bytes (in byte order), 256 "he", 257 "ll", 258 "hell", 259 "hello",
    /// 260 "Ġw", 261 "or", 262 "Ġwor", 263 "ld", 264 "Ġworld", 265 "ä½" (first two bytes of
    /// 你), 266 <|endoftext|>, 267 <|im_start|>, 268 <|im_end|>, 269 <tool_call>, 270 [PAD270].
    pub(crate) fn tiny_metadata() -> HashMap<String, Value> {
        let bc = byte_chars();
        let mut tokens: Vec<String> = bc.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1i32; 256];
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        tokens.push(format!("{}{}", bc[0xE4], bc[0xBD]));
        types.push(1);
        let mut merges: Vec<String> = merges.iter().map(|s| s.to_string()).collect();
        merges.push(format!("{} {}", bc[0xE4], bc[0xBD]));
        for (t, ty) in [
            ("<|endoftext|>", 3),
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<tool_call>", 4),
            ("[PAD270]", 5),
        ] {
            tokens.push(t.to_string());
            types.push(ty);
        }
        let s = |x: &str| Value::String(x.to_string());
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("qwen2"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        );
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(268));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(266));
        md.insert(
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
               {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        );
        md
    }

    pub(crate) fn tiny() -> TextTokenizer {
        TextTokenizer::from_gguf_metadata(&tiny_metadata()).expect("tiny tokenizer builds")
    }

    #[test]
    fn tiny_gguf_encodes_with_merges_and_specials() {
        let t = tiny();
        // "hello world": "hello" merges fully; " world" → Ġworld.
        assert_eq!(t.encode("hello world", true).unwrap(), vec![259, 264]);
        // "hello" + "!" (byte 0x21 → id 33); specials map to single ids.
        assert_eq!(
            t.encode("<|im_start|>hello!<|im_end|>", false).unwrap(),
            vec![267, 259, 33, 268]
        );
        // 你 = e4 bd a0 → merged "ä½" + byte a0.
        assert_eq!(t.encode("你", true).unwrap(), vec![265, 0xA0]);
        assert_eq!(t.encode("<tool_call>", true).unwrap(), vec![269]);
        assert_eq!(
            t.decode(&[267, 259, 264, 268], false).unwrap(),
            "<|im_start|>hello world<|im_end|>"
        );
        assert_eq!(
            t.decode(&[267, 259, 264, 268], true).unwrap(),
            "hello world"
        );
        // <tool_call> is an added but not special token: kept when skipping specials.
        assert_eq!(t.decode(&[269, 259], true).unwrap(), "<tool_call>hello");
        assert!(t.is_special(268) && t.is_special(266));
        assert!(!t.is_special(269) && !t.is_special(259));
        assert_eq!(t.eos_token_ids(), &[268, 266]);
        assert_eq!(t.token_to_id("[PAD270]"), None);
        assert_eq!(t.id_to_token(262).as_deref(), Some("Ġwor"));
        assert_eq!(t.vocab_size(), 270);
        assert_eq!(t.bos_token(), Some("<|endoftext|>"));
        assert_eq!(t.eos_token(), Some("<|im_end|>"));
    }

    #[test]
    fn token_table_gives_each_tokens_bytes() {
        let t = tiny();
        let table = crate::tokenizer::TokenTable::new(&t);
        assert_eq!(table.bytes(260), b" w");
        assert_eq!(table.bytes(259), b"hello");
        assert_eq!(table.bytes(b'\n' as u32), b"\n");
        assert_eq!(table.bytes(265), "你".as_bytes()[..2].to_vec().as_slice());
        assert_eq!(table.text(265), "\u{FFFD}");
        assert_eq!(table.text(268), "<|im_end|>");
        assert_eq!(table.bytes(100_000), b"");
    }

    #[test]
    fn tiny_gguf_chat_template() {
        use crate::tokenizer::{ChatMessage, ChatOptions};
        let t = tiny();
        let opts = ChatOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let s = t
            .apply_chat_template(&[ChatMessage::new("user", "hello")], &opts)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.encode(&s, false).unwrap(),
            vec![
                267, 117, 115, 101, 114, 10, 259, 268, 10, 267, 97, 115, 115, 105, 115, 116, 97,
                110, 116, 10
            ]
        );
    }

    #[test]
    fn unsupported_models_are_rejected() {
        let mut md = tiny_metadata();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = TextTokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("`llama`"), "{err}");
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("llama-bpe".into()),
        );
        assert!(matches!(
            TextTokenizer::from_gguf_metadata(&md),
            Err(EngineError::Unsupported(_))
        ));
        let mut md = tiny_metadata();
        md.remove("tokenizer.ggml.merges");
        assert!(matches!(
            TextTokenizer::from_gguf_metadata(&md),
            Err(EngineError::Tokenizer(_))
        ));
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("ab".into())]),
        );
        assert!(matches!(
            TextTokenizer::from_gguf_metadata(&md),
            Err(EngineError::Tokenizer(_))
        ));
    }
}
