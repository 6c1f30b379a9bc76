//! The prefix cache's bookkeeping: which token prefixes have their KV kept, under which
//! cache sequence id, and which to evict. Pure: the engine carries out what it decides on
//! the KV cache (copy a prefix out of an entry, drop an entry's sequence).
//!
//! The KV cache is unified: a cell belongs to a *set* of sequences, so copying an entry's
//! prefix into a running sequence (or a finished prompt into an entry) tags cells and moves
//! no memory; requests sharing a system prompt share its cells, concurrent ones included.
//! Entries are whole prompts, looked up by longest common prefix (SGLang's radix cache
//! keeps the same information as a tree; with a bounded number of entries of a few hundred
//! tokens a scan costs microseconds per request). An entry that is a prefix of a newer one
//! is dropped: the newer one answers every lookup it would. Eviction is least recently used.

/// A cached prefix that a prompt can start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The cache sequence holding the KV.
    pub seq: i32,
    /// Tokens of the prompt whose KV it holds.
    pub len: usize,
}

/// What to do on the KV cache to store a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// Copy the prompt's KV into this cache sequence.
    pub seq: i32,
    /// Cache sequences to clear first (evicted or subsumed entries).
    pub dropped: Vec<i32>,
}

#[derive(Debug)]
struct Entry {
    seq: i32,
    tokens: Vec<u32>,
    last_used: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub lookups: u64,
    pub hits: u64,
    /// Prompt tokens whose KV came from the cache.
    pub hit_tokens: u64,
    pub entries: usize,
    /// Tokens held by entries (shared cells counted once per entry).
    pub tokens: usize,
}

#[derive(Debug)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    free: Vec<i32>,
    clock: u64,
    /// Shortest prefix worth keeping or reusing.
    min_tokens: usize,
    stats: CacheStats,
}

impl PrefixCache {
    /// A cache whose entries use the sequence ids `seq_ids` (an empty range disables it).
    pub fn new(seq_ids: std::ops::Range<i32>, min_tokens: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            free: seq_ids.rev().collect(),
            clock: 0,
            min_tokens: min_tokens.max(1),
            stats: CacheStats::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.free.is_empty() || !self.entries.is_empty()
    }

    /// The entry sharing the longest prefix with `prompt`, at most `limit` tokens of it.
    pub fn lookup(&mut self, prompt: &[u32], limit: usize) -> Option<Hit> {
        if !self.enabled() {
            return None;
        }
        self.stats.lookups += 1;
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let shared = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(limit);
                (shared, e)
            })
            .filter(|(shared, _)| *shared >= self.min_tokens)
            .max_by_key(|(shared, e)| (*shared, e.last_used))?;
        let (len, entry) = best;
        entry.last_used = clock;
        self.stats.hits += 1;
        self.stats.hit_tokens += len as u64;
        Some(Hit { seq: entry.seq, len })
    }

    /// Where to keep `tokens` (a prompt now in the KV cache), or `None` when an entry already
    /// covers it or the cache is off.
    pub fn store(&mut self, tokens: &[u32]) -> Option<Store> {
        if !self.enabled() || tokens.len() < self.min_tokens {
            return None;
        }
        self.clock += 1;
        if let Some(covering) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            covering.last_used = self.clock;
            return None;
        }
        let mut dropped = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if tokens.starts_with(&self.entries[i].tokens) {
                let subsumed = self.entries.swap_remove(i);
                self.free.push(subsumed.seq);
                dropped.push(subsumed.seq);
            } else {
                i += 1;
            }
        }
        if self.free.is_empty() {
            dropped.extend(self.evict_lru());
        }
        let seq = self.free.pop()?;
        self.entries.push(Entry { seq, tokens: tokens.to_vec(), last_used: self.clock });
        Some(Store { seq, dropped })
    }

    /// Drops the least recently used entry; its sequence must be cleared.
    pub fn evict_lru(&mut self) -> Option<i32> {
        let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)?;
        let entry = self.entries.swap_remove(oldest);
        self.free.push(entry.seq);
        Some(entry.seq)
    }

    /// Drops every entry; returns their sequences.
    pub fn clear(&mut self) -> Vec<i32> {
        let seqs: Vec<i32> = self.entries.drain(..).map(|e| e.seq).collect();
        self.free.extend(&seqs);
        seqs
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            tokens: self.entries.iter().map(|e| e.tokens.len()).sum(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_is_capped() {
        let mut cache = PrefixCache::new(10..14, 2);
        let a = cache.store(&[1, 2, 3, 4]).unwrap();
        let b = cache.store(&[1, 2, 9]).unwrap();
        assert_ne!(a.seq, b.seq);
        assert_eq!(cache.lookup(&[1, 2, 3, 4, 5], 4), Some(Hit { seq: a.seq, len: 4 }));
        assert_eq!(cache.lookup(&[1, 2, 3, 4], 3), Some(Hit { seq: a.seq, len: 3 }), "the last token is recomputed");
        assert_eq!(cache.lookup(&[1, 2, 9, 9], 3), Some(Hit { seq: b.seq, len: 3 }));
        assert_eq!(cache.lookup(&[7, 2, 3], 3), None);
        assert_eq!(cache.lookup(&[1, 5], 2), None, "shorter than min_tokens");
        let stats = cache.stats();
        assert_eq!((stats.lookups, stats.hits, stats.hit_tokens), (5, 3, 10));
    }

    #[test]
    fn covered_prompts_are_not_stored_and_subsumed_entries_go() {
        let mut cache = PrefixCache::new(0..4, 1);
        let short = cache.store(&[1, 2]).unwrap();
        assert_eq!(cache.store(&[1]), None, "an entry already covers it");
        let long = cache.store(&[1, 2, 3]).unwrap();
        assert_eq!(long.dropped, vec![short.seq]);
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn least_recently_used_is_evicted_when_ids_run_out() {
        let mut cache = PrefixCache::new(0..2, 1);
        let a = cache.store(&[1]).unwrap();
        let b = cache.store(&[2]).unwrap();
        cache.lookup(&[1, 5], 1); // a is now more recent than b
        let c = cache.store(&[3]).unwrap();
        assert_eq!(c.dropped, vec![b.seq]);
        assert_eq!(c.seq, b.seq);
        assert_eq!(cache.lookup(&[1, 0], 1).map(|h| h.seq), Some(a.seq));
        assert_eq!(cache.lookup(&[2, 0], 1), None);
        assert_eq!(cache.clear().len(), 2);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn an_empty_id_range_disables_the_cache() {
        let mut cache = PrefixCache::new(0..0, 1);
        assert_eq!(cache.store(&[1, 2]), None);
        assert_eq!(cache.lookup(&[1, 2], 1), None);
    }
}
