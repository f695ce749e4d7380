//! Prefix caching: full KV blocks of prompts are remembered by a hash of all the tokens up to
//! and including the block, so a later request with the same prefix (a shared system prompt,
//! a growing chat history) reuses them instead of recomputing.
//!
//! The cache holds one reference to each block it remembers; when the pool runs short, blocks
//! that only the cache still holds are given back, least recently used first.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::kv::{KvCache, SeqCache};

#[derive(Debug, Default)]
pub struct PrefixCache {
    /// Chain hash → (block, last use tick).
    blocks: HashMap<u64, (u32, u64)>,
    tick: u64,
}

fn chain_hash(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// Share the longest cached run of full blocks of `tokens` into the empty `seq`, leaving at
    /// least one token to compute (its logits are needed). Returns the positions reused.
    pub fn attach(&mut self, kv: &mut KvCache, tokens: &[u32], seq: &mut SeqCache) -> usize {
        debug_assert!(seq.blocks.is_empty() && seq.len == 0);
        let bs = kv.block_size();
        let usable = tokens.len().saturating_sub(1) / bs;
        let mut prev = 0u64;
        self.tick += 1;
        for i in 0..usable {
            prev = chain_hash(prev, &tokens[i * bs..(i + 1) * bs]);
            match self.blocks.get_mut(&prev) {
                Some((b, used)) => {
                    *used = self.tick;
                    kv.retain_block(*b);
                    seq.blocks.push(*b);
                }
                None => break,
            }
        }
        seq.len = seq.blocks.len() * bs;
        seq.len
    }

    /// Remember the full blocks of `seq` that hold `tokens` (its prompt), once computed.
    pub fn insert(&mut self, kv: &mut KvCache, tokens: &[u32], seq: &SeqCache) {
        let bs = kv.block_size();
        let full = tokens.len().min(seq.len) / bs;
        let mut prev = 0u64;
        self.tick += 1;
        for i in 0..full {
            prev = chain_hash(prev, &tokens[i * bs..(i + 1) * bs]);
            if let std::collections::hash_map::Entry::Vacant(e) = self.blocks.entry(prev) {
                kv.retain_block(seq.blocks[i]);
                e.insert((seq.blocks[i], self.tick));
            }
        }
    }

    /// Give back up to `want` blocks that only the cache holds, least recently used first.
    /// Returns how many were freed.
    pub fn evict(&mut self, kv: &mut KvCache, want: usize) -> usize {
        let mut idle: Vec<(u64, u64, u32)> = self
            .blocks
            .iter()
            .filter(|(_, (b, _))| kv.allocator().ref_count(*b) == 1)
            .map(|(h, (b, t))| (*t, *h, *b))
            .collect();
        idle.sort_unstable();
        let mut freed = 0;
        for (_, h, b) in idle.into_iter().take(want) {
            self.blocks.remove(&h);
            kv.release_block(b);
            freed += 1;
        }
        freed
    }

    /// Blocks the cache holds.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
    /// Blocks only the cache holds (reclaimable at once).
    pub fn idle(&self, kv: &KvCache) -> usize {
        self.blocks.values().filter(|(b, _)| kv.allocator().ref_count(*b) == 1).count()
    }
}
