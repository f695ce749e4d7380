//! Stop-string matching over streamed text deltas.
//!
//! Text that cannot be the beginning of a stop string is released immediately; a suffix that
//! may still grow into a stop string is held back until it either completes (generation stops,
//! the stop string and anything after it are dropped) or diverges (the text is released).

use crate::error::{EngineError, Result};

/// Result of feeding one delta to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send to the client now.
    pub emit: String,
    /// A stop string has been completed; generation must end. `emit` holds the text before it.
    pub stopped: bool,
}

/// Incremental stop-string matcher. See the module docs.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Held-back text: always a (possibly empty) proper prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Creates a matcher for `stops`. Empty stop strings are rejected (field `stop`).
    /// Duplicates are ignored. An empty list yields a matcher that never stops or holds text.
    pub fn new(stops: Vec<String>) -> Result<Self> {
        let mut uniq: Vec<String> = Vec::with_capacity(stops.len());
        for (i, s) in stops.into_iter().enumerate() {
            if s.is_empty() {
                return Err(EngineError::invalid(
                    "stop",
                    format!("stop[{i}] is an empty string"),
                ));
            }
            if !uniq.contains(&s) {
                uniq.push(s);
            }
        }
        Ok(StopMatcher {
            stops: uniq,
            held: String::new(),
            stopped: false,
        })
    }

    /// Whether a stop string has already been matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next text delta. After a stop, every further call returns an empty `emit`
    /// with `stopped == true`.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                emit: delta.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(delta);
        let buf = std::mem::take(&mut self.held);

        // Earliest complete occurrence of any stop string. Any occurrence must start inside
        // the held part or the new delta, since emitted text never ended with a stop prefix.
        let earliest = self.stops.iter().filter_map(|s| buf.find(s.as_str())).min();
        if let Some(pos) = earliest {
            self.stopped = true;
            let mut emit = buf;
            emit.truncate(pos);
            return StopOutcome {
                emit,
                stopped: true,
            };
        }

        // Longest suffix of `buf` that is a proper prefix of some stop string.
        let hold_from = buf
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &buf[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(buf.len());
        let mut emit = buf;
        self.held = emit.split_off(hold_from);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// End of generation: releases any held-back text (nothing if a stop string matched).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            self.held.clear();
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn out(emit: &str, stopped: bool) -> StopOutcome {
        StopOutcome {
            emit: emit.to_string(),
            stopped,
        }
    }

    #[test]
    fn stop_split_across_single_char_deltas() {
        let mut s = m(&["###"]);
        assert_eq!(s.push("Answer: 42"), out("Answer: 42", false));
        assert_eq!(s.push("#"), out("", false));
        assert_eq!(s.push("#"), out("", false));
        assert_eq!(s.push("#"), out("", true));
        assert!(s.is_stopped());
        assert_eq!(s.push("more"), out("", true));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn false_partial_is_released() {
        let mut s = m(&["###"]);
        assert_eq!(s.push("x#"), out("x", false));
        assert_eq!(s.push("#"), out("", false));
        assert_eq!(s.push("a"), out("##a", false));
        assert_eq!(s.push("##"), out("", false));
        assert_eq!(s.finish(), "##");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn stop_in_middle_of_delta() {
        let mut s = m(&["STOP"]);
        assert_eq!(s.push("hello STOP world"), out("hello ", true));
        let mut s = m(&["STOP"]);
        assert_eq!(s.push("hello ST"), out("hello ", false));
        assert_eq!(s.push("OP and more"), out("", true));
    }

    #[test]
    fn overlapping_prefix_restarts_match() {
        // "aab": after "aa" the held text "aa" diverges at 'a' but its suffix "a" is still live.
        let mut s = m(&["ab"]);
        assert_eq!(s.push("a"), out("", false));
        assert_eq!(s.push("a"), out("a", false));
        assert_eq!(s.push("b"), out("", true));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut s = m(&["world", "lo w"]);
        assert_eq!(s.push("hello world"), out("hel", true));
        let mut s = m(&["</s>", "\n\n"]);
        assert_eq!(s.push("a\n"), out("a", false));
        assert_eq!(s.push("<"), out("\n", false));
        assert_eq!(s.push("/s>tail"), out("", true));
    }

    #[test]
    fn multibyte_stop_and_text() {
        let mut s = m(&["。\n"]);
        assert_eq!(s.push("你好。"), out("你好", false));
        assert_eq!(s.push("世"), out("。世", false));
        assert_eq!(s.push("界。"), out("界", false));
        assert_eq!(s.push("\n再见"), out("", true));
    }

    #[test]
    fn no_stops_passes_through_and_empty_rejected() {
        let mut s = m(&[]);
        assert_eq!(s.push("###"), out("###", false));
        assert_eq!(s.finish(), "");
        let err = StopMatcher::new(vec!["ok".into(), String::new()]).unwrap_err();
        assert!(matches!(
            err,
            EngineError::InvalidParam { field: "stop", .. }
        ));
    }
}
