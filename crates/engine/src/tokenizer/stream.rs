//! Incremental (streaming) detokenization.
//!
//! Byte-level BPE tokens do not align with UTF-8 characters: one CJK character or emoji may
//! be spread over several tokens. [`IncrementalDecoder`] keeps a small window of recent ids
//! and uses the prefix-offset technique of HF text-generation-inference / candle's
//! `TokenOutputStream`: it decodes `ids[prefix..]`, subtracts the already-emitted
//! `ids[prefix..read]` text and only emits once the tail no longer ends in U+FFFD (an
//! incomplete UTF-8 sequence). Each push decodes only the window, so cost is O(1) per token.

use crate::error::Result;

use super::TextTokenizer;

/// A tail still ending in U+FFFD after this many undecided tokens is emitted anyway: no
/// valid UTF-8 character needs more than 4 bytes, so the replacement character is real
/// (an invalid byte sequence) rather than an incomplete one.
const MAX_PENDING_TOKENS: usize = 6;

/// Streaming detokenizer for one sequence. Special tokens are skipped.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    /// Window of recent non-special ids.
    ids: Vec<u32>,
    /// Start of the context that was already emitted (kept for correct merging/spacing).
    prefix_offset: usize,
    /// End of the emitted part; ids after it are pending.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Creates a decoder for a new sequence (cheap: the tokenizer is shared).
    pub fn new(tokenizer: &TextTokenizer) -> Self {
        IncrementalDecoder {
            tokenizer: tokenizer.clone(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Feeds one generated token; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.tokenizer.is_special(id) {
            return Ok(None);
        }
        self.ids.push(id);
        let prefix_text = self.decode_range(self.prefix_offset, self.read_offset)?;
        let new_text = self.decode_range(self.prefix_offset, self.ids.len())?;
        let pending = self.ids.len() - self.read_offset;
        if new_text.len() <= prefix_text.len()
            || (new_text.ends_with('\u{FFFD}') && pending < MAX_PENDING_TOKENS)
        {
            return Ok(None);
        }
        let delta = text_after(&prefix_text, &new_text);
        // Slide the window: the new context is what we just emitted.
        let consumed = self.read_offset;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if consumed > 0 {
            self.ids.drain(..consumed);
            self.prefix_offset -= consumed;
            self.read_offset -= consumed;
        }
        Ok(if delta.is_empty() { None } else { Some(delta) })
    }

    /// End of the sequence: returns any pending text (possibly containing U+FFFD if the
    /// sequence ended inside a character) and resets the decoder.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix_text = self.decode_range(self.prefix_offset, self.read_offset)?;
        let new_text = self.decode_range(self.prefix_offset, self.ids.len())?;
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        let delta = text_after(&prefix_text, &new_text);
        Ok(if delta.is_empty() { None } else { Some(delta) })
    }

    fn decode_range(&self, start: usize, end: usize) -> Result<String> {
        match self.ids.get(start..end) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode(ids, true),
            _ => Ok(String::new()),
        }
    }
}

/// The part of `new` after `prefix`. Falls back to the part after the longest common prefix
/// when `new` does not start with `prefix` (cannot happen with byte-level BPE).
fn text_after(prefix: &str, new: &str) -> String {
    if let Some(rest) = new.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(new.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(new.len()));
    tracing::debug!(
        prefix,
        new,
        "incremental decode: window text is not an extension of the emitted prefix"
    );
    new.get(common..).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::gguf::tests::tiny;

    /// Pushes all ids, returning the deltas (finish() included when non-empty).
    fn stream(t: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = t.incremental_decoder();
        let mut out = Vec::new();
        for &id in ids {
            if let Some(s) = d.push(id).unwrap() {
                out.push(s);
            }
        }
        if let Some(s) = d.finish().unwrap() {
            out.push(s);
        }
        out
    }

    #[test]
    fn zwj_emoji_split_over_byte_tokens_streams_whole_chars() {
        let t = tiny();
        let text = "hi 👩‍💻!";
        let ids = t.encode(text, false).unwrap();
        // Tiny vocab: every byte of the emoji sequence is its own token.
        assert_eq!(
            ids,
            vec![
                104, 105, 32, 0xF0, 0x9F, 0x91, 0xA9, 0xE2, 0x80, 0x8D, 0xF0, 0x9F, 0x92, 0xBB, 33
            ]
        );
        let deltas = stream(&t, &ids);
        assert_eq!(deltas, vec!["h", "i", " ", "👩", "\u{200D}", "💻", "!"]);
        assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn cjk_split_over_merged_and_byte_tokens() {
        let t = tiny();
        let text = "你好hello你";
        let ids = t.encode(text, false).unwrap();
        // 你 = [ä½ (265), a0]; 好 = e5 a5 bd.
        assert_eq!(ids, vec![265, 0xA0, 0xE5, 0xA5, 0xBD, 259, 265, 0xA0]);
        let mut d = t.incremental_decoder();
        let got: Vec<Option<String>> = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        assert_eq!(
            got,
            vec![
                None,
                Some("你".to_string()),
                None,
                None,
                Some("好".to_string()),
                Some("hello".to_string()),
                None,
                Some("你".to_string()),
            ]
        );
        assert_eq!(d.finish().unwrap(), None);
    }

    #[test]
    fn special_tokens_are_skipped_and_finish_flushes_partial() {
        let t = tiny();
        // <|im_start|> hello <|im_end|> then a dangling first byte of 你.
        let ids = [267, 259, 268, 265];
        let mut d = t.incremental_decoder();
        assert_eq!(d.push(267).unwrap(), None);
        assert_eq!(d.push(259).unwrap().as_deref(), Some("hello"));
        assert_eq!(d.push(268).unwrap(), None);
        assert_eq!(d.push(265).unwrap(), None);
        assert_eq!(d.finish().unwrap().as_deref(), Some("\u{FFFD}"));
        assert_eq!(t.decode(&ids, true).unwrap(), "hello\u{FFFD}");
        // The decoder is reusable after finish().
        assert_eq!(d.push(259).unwrap().as_deref(), Some("hello"));
    }

    #[test]
    fn invalid_bytes_do_not_stall_forever() {
        let t = tiny();
        // A run of lone continuation bytes never becomes valid UTF-8.
        let ids = vec![0x80u32; 8];
        let deltas = stream(&t, &ids);
        assert!(deltas.len() >= 2, "{deltas:?}");
        assert_eq!(deltas.concat(), "\u{FFFD}".repeat(8));
    }

    #[test]
    fn window_stays_small() {
        let t = tiny();
        let mut d = t.incremental_decoder();
        for _ in 0..1000 {
            d.push(259).unwrap();
        }
        assert!(d.ids.len() <= 2, "window grew to {}", d.ids.len());
    }
}
