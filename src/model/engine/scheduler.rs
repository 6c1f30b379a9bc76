//! The engine thread's loop: admit waiting requests into the running batch, build one
//! batch of decode tokens and prefill chunks, run it, and turn each sequence's logits into
//! its next token, its logprobs and its text. Generic over [`Backend`], so the rules here
//! do not depend on llama.cpp.

use super::constraint::Constraint;
use super::llama::{Backend, BatchToken, DecodeFailure};
use super::metrics::EngineMetrics;
use super::prefix_cache::PrefixCache;
use super::sampling::{log_normalizer, top_k, Sampler};
use super::text::TextStream;
use super::{EngineOptions, Event, FinishReason, Pending, TokenLogprob};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Generated token ids to text (the model's tokenizer).
pub type Detokenizer = Box<dyn Fn(&[u32]) -> Result<String, String> + Send>;

/// Shortest prefix worth caching or reusing.
const MIN_CACHED_PREFIX: usize = 4;

struct Sequence {
    slot: i32,
    /// Which request (for siblings of an `n > 1` request).
    group: u64,
    choice: u32,
    /// The prompt, then every generated token.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    in_kv: usize,
    /// A sibling waits for choice 0's prefill, then copies its KV.
    awaiting_sibling: bool,
    max_tokens: usize,
    sampler: Sampler,
    text: TextStream,
    logprobs: Option<u32>,
    prompt_logprobs: Option<u32>,
    logit_bias: Vec<(u32, f32)>,
    prompt_scores: Vec<Option<TokenLogprob>>,
    constraint: Option<Constraint>,
    events: mpsc::UnboundedSender<Event>,
    reserved: usize,
    accepted: Instant,
    first_token_seen: bool,
    done: Option<FinishReason>,
    /// A failure to report instead of a finish.
    failure: Option<String>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn pending(&self) -> usize {
        if self.awaiting_sibling {
            0
        } else {
            self.tokens.len() - self.in_kv
        }
    }
}

pub struct Scheduler<B: Backend> {
    backend: B,
    options: EngineOptions,
    metrics: Arc<EngineMetrics>,
    stop_ids: Vec<u32>,
    detokenize: Detokenizer,
    waiting: VecDeque<Pending>,
    running: Vec<Sequence>,
    free_slots: Vec<i32>,
    cache: PrefixCache,
    reserved: usize,
    next_group: u64,
}

impl<B: Backend> Scheduler<B> {
    pub fn new(
        backend: B,
        options: EngineOptions,
        metrics: Arc<EngineMetrics>,
        stop_ids: Vec<u32>,
        detokenize: Detokenizer,
    ) -> Self {
        let slots = options.max_running as i32;
        let cache = PrefixCache::new(slots..slots + options.prefix_entries as i32, MIN_CACHED_PREFIX);
        Scheduler {
            backend,
            free_slots: (0..slots).rev().collect(),
            cache,
            options,
            metrics,
            stop_ids,
            detokenize,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            next_group: 0,
        }
    }

    /// Runs until every handle is gone and nothing is left to do.
    pub fn run(mut self, requests: std_mpsc::Receiver<Pending>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                match requests.recv() {
                    Ok(p) => self.waiting.push_back(p),
                    Err(_) => return,
                }
            }
            loop {
                match requests.try_recv() {
                    Ok(p) => self.waiting.push_back(p),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.admit();
            self.step();
            self.retire();
            self.publish();
        }
    }

    /// Moves waiting requests into the batch while slots and KV reservations allow, in
    /// arrival order (a request that does not fit waits; those behind it wait too).
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            if front.events.is_closed() {
                self.waiting.pop_front();
                self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let request = &front.request;
            let n = request.n as usize;
            let max_tokens = (request.max_tokens as usize).min(self.context().saturating_sub(request.prompt.len()));
            let need = n * (request.prompt.len() + max_tokens);
            if self.free_slots.len() < n || (self.reserved + need > self.options.kv_tokens && !self.running.is_empty())
            {
                return;
            }
            let Some(pending) = self.waiting.pop_front() else { return };
            self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
            self.start(pending, max_tokens);
        }
    }

    fn context(&self) -> usize {
        self.options.kv_tokens
    }

    fn start(&mut self, pending: Pending, max_tokens: usize) {
        let Pending { request, constraint, events, accepted } = pending;
        let group = self.next_group;
        self.next_group += 1;
        self.metrics.prompt_tokens_total.fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
        let per_sequence = request.prompt.len() + max_tokens;
        for choice in 0..request.n {
            let Some(slot) = self.free_slots.pop() else { return };
            let constraint = match (&constraint, choice) {
                (Some(c), _) => Some(c.fork()),
                (None, _) => None,
            };
            let mut sequence = Sequence {
                slot,
                group,
                choice,
                tokens: request.prompt.clone(),
                prompt_len: request.prompt.len(),
                in_kv: 0,
                awaiting_sibling: choice > 0,
                max_tokens,
                sampler: Sampler::new(request.sampling, choice),
                text: TextStream::new(&request.stop),
                logprobs: request.logprobs,
                logit_bias: request.logit_bias.clone(),
                prompt_logprobs: if choice == 0 { request.prompt_logprobs } else { None },
                prompt_scores: Vec::new(),
                constraint,
                events: events.clone(),
                reserved: per_sequence,
                accepted,
                first_token_seen: false,
                done: None,
                failure: None,
            };
            if choice == 0 && sequence.prompt_logprobs.is_none() {
                // Reuse a cached prefix; at least the last prompt token is computed, for
                // its logits. Scoring the prompt needs every position's logits, so it
                // computes all of them.
                if let Some(hit) = self.cache.lookup(&sequence.tokens, sequence.prompt_len - 1) {
                    self.backend.copy_prefix(hit.seq, slot, hit.len);
                    sequence.in_kv = hit.len;
                }
            }
            if sequence.prompt_logprobs.is_some() {
                sequence.prompt_scores.push(None);
            }
            self.reserved += per_sequence;
            self.running.push(sequence);
        }
    }

    /// One forward pass over every sequence with work, then their next tokens.
    fn step(&mut self) {
        let batch = self.build_batch();
        if batch.is_empty() {
            return;
        }
        let tokens: Vec<BatchToken> = batch.iter().map(|(_, t)| *t).collect();
        loop {
            match self.backend.decode(&tokens) {
                Ok(()) => break,
                Err(DecodeFailure::NoSpace) => {
                    // The reservations guarantee room once the prefix cache is gone.
                    match self.cache.evict_lru() {
                        Some(seq) => self.backend.clear(seq),
                        None => {
                            let message = "the KV cache is full".to_string();
                            return self.fail_batch(&batch, message);
                        }
                    }
                }
                Err(DecodeFailure::Failed(message)) => return self.fail_batch(&batch, message),
            }
        }
        self.metrics.steps_total.fetch_add(1, Ordering::Relaxed);
        self.after_decode(&batch);
    }

    /// (index into `running`, token) for this step: one token for each decoding sequence,
    /// then prefill chunks in arrival order within the step's token budget.
    fn build_batch(&mut self) -> Vec<(usize, BatchToken)> {
        let mut batch = Vec::new();
        let mut budget = self.options.batch_tokens;
        let mut order: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].pending() > 0).collect();
        // Decoding sequences (one pending token) first, so prefill never starves them.
        order.sort_by_key(|&i| (self.running[i].pending() > 1, self.running[i].group));
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let chunk = s.pending().min(budget);
            budget -= chunk;
            for pos in s.in_kv..s.in_kv + chunk {
                let last = pos + 1 == s.tokens.len();
                let scoring = s.prompt_logprobs.is_some() && pos + 1 < s.prompt_len;
                batch.push((i, BatchToken { token: s.tokens[pos], pos, seq: s.slot, logits: last || scoring }));
            }
        }
        batch
    }

    fn fail_batch(&mut self, batch: &[(usize, BatchToken)], message: String) {
        let mut seen = std::collections::HashSet::new();
        for (i, _) in batch {
            if seen.insert(*i) {
                self.running[*i].failure = Some(message.clone());
            }
        }
    }

    fn after_decode(&mut self, batch: &[(usize, BatchToken)]) {
        let mut last_of: Vec<Option<usize>> = vec![None; self.running.len()];
        for (b, (i, t)) in batch.iter().enumerate() {
            let s = &mut self.running[*i];
            s.in_kv = t.pos + 1;
            if t.logits && t.pos + 1 < s.prompt_len && s.prompt_logprobs.is_some() {
                let k = s.prompt_logprobs.unwrap_or(0) as usize;
                let logits = self.backend.logits(b);
                let next = s.tokens[t.pos + 1];
                s.prompt_scores.push(Some(score(logits, next, k)));
            }
            if t.pos + 1 == s.tokens.len() {
                last_of[*i] = Some(b);
            }
        }
        for (i, last) in last_of.into_iter().enumerate() {
            if let Some(b) = last {
                self.advance(i, b);
            }
        }
    }

    /// Sequence `i` has all its tokens in the KV cache; the `b`-th batch row holds the
    /// logits of its last one.
    fn advance(&mut self, i: usize, b: usize) {
        if self.running[i].generated() == 0 {
            self.prompt_done(i);
        }
        let s = &mut self.running[i];
        if s.generated() >= s.max_tokens {
            s.done = Some(FinishReason::Length);
            return;
        }
        let raw = self.backend.logits(b);
        let biased: Vec<f32>;
        let logits = if s.logit_bias.is_empty() {
            raw
        } else {
            biased = with_bias(raw, &s.logit_bias);
            &biased
        };
        let mask = match s.constraint.as_mut().map(Constraint::allowed) {
            Some(Ok(mask)) => Some(mask),
            Some(Err(e)) => {
                s.failure = Some(format!("structured output: {e}"));
                return;
            }
            None => None,
        };
        let allowed = mask.as_ref().map(|m| move |id: u32| m.is_allowed(id));
        let token = s.sampler.pick(logits, allowed.as_ref().map(|f| f as &dyn Fn(u32) -> bool));
        let logprob = s.logprobs.map(|k| score(logits, token, k as usize));
        if !s.first_token_seen {
            s.first_token_seen = true;
            self.metrics.ttft.observe(s.accepted.elapsed());
        }
        if self.stop_ids.contains(&token) {
            s.done = Some(FinishReason::Stop);
            return;
        }
        if let Some(c) = s.constraint.as_mut() {
            if let Err(e) = c.advance(token) {
                s.failure = Some(format!("structured output: {e}"));
                return;
            }
        }
        self.metrics.generated_tokens_total.fetch_add(1, Ordering::Relaxed);
        s.tokens.push(token);
        let step = match s.text.push(token, self.detokenize.as_ref()) {
            Ok(step) => step,
            Err(e) => {
                s.failure = Some(e);
                return;
            }
        };
        if s.events.send(Event::Token { choice: s.choice, token, piece: step.piece, logprob }).is_err() {
            s.done = Some(FinishReason::Stop);
            return;
        }
        if step.stopped {
            s.done = Some(FinishReason::Stop);
        } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.options.kv_tokens {
            s.done = Some(FinishReason::Length);
        }
    }

    /// Choice 0's prompt is in the KV cache: report its scores, keep it in the prefix
    /// cache, and let its siblings copy it.
    fn prompt_done(&mut self, i: usize) {
        let s = &mut self.running[i];
        if s.choice != 0 {
            return;
        }
        if s.prompt_logprobs.is_some() {
            let scores = std::mem::take(&mut s.prompt_scores);
            let _ = s.events.send(Event::Prompt(scores));
        }
        let (slot, group, prompt_len) = (s.slot, s.group, s.prompt_len);
        if let Some(store) = self.cache.store(&self.running[i].tokens[..prompt_len]) {
            for seq in store.dropped {
                self.backend.clear(seq);
            }
            self.backend.copy_prefix(slot, store.seq, prompt_len);
        }
        for sibling in self.running.iter_mut().filter(|s| s.group == group && s.awaiting_sibling) {
            self.backend.copy_prefix(slot, sibling.slot, prompt_len - 1);
            sibling.in_kv = prompt_len - 1;
            sibling.awaiting_sibling = false;
        }
    }

    /// Finished, failed and abandoned sequences leave the batch and free their KV.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let gone = s.events.is_closed();
            if s.done.is_none() && s.failure.is_none() && !gone {
                i += 1;
                continue;
            }
            let mut s = self.running.swap_remove(i);
            if s.awaiting_sibling || s.choice == 0 {
                // A sibling still waiting for this prefill can no longer copy it.
                let group = s.group;
                let failed = s.failure.clone().or_else(|| s.done.is_none().then(|| "cancelled".to_string()));
                if s.generated() == 0 && s.choice == 0 {
                    for sibling in self.running.iter_mut().filter(|o| o.group == group && o.awaiting_sibling) {
                        sibling.failure = Some(failed.clone().unwrap_or_else(|| "the first choice ended".into()));
                    }
                }
            }
            self.backend.clear(s.slot);
            self.free_slots.push(s.slot);
            self.reserved -= s.reserved;
            if !gone {
                match (s.failure.take(), s.done) {
                    (Some(message), _) => {
                        let _ = s.events.send(Event::Failed(message));
                    }
                    (None, Some(finish)) => {
                        if s.prompt_logprobs.is_some() && !s.prompt_scores.is_empty() {
                            let _ = s.events.send(Event::Prompt(std::mem::take(&mut s.prompt_scores)));
                        }
                        let _ = s.events.send(Event::Finished {
                            choice: s.choice,
                            finish,
                            completion_tokens: s.generated() as u32,
                            text_tail: s.text.finish(),
                        });
                    }
                    (None, None) => {}
                }
                self.metrics.latency.observe(s.accepted.elapsed());
            }
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.store(self.running.len(), Ordering::SeqCst);
        m.kv_tokens_reserved.store(self.reserved, Ordering::SeqCst);
        let held: usize = (0..self.options.max_running as i32).map(|slot| self.backend.held(slot)).sum();
        m.kv_tokens_running.store(held, Ordering::SeqCst);
        *crate::support::lock(&m.cache) = self.cache.stats();
        m.sample_rate(Instant::now());
    }
}

/// `token`'s logprob under `logits` and the `k` most likely alternatives.
fn score(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let z = log_normalizer(logits);
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - z) as f32);
    TokenLogprob { token, logprob, top: top_k(logits, k, z) }
}

/// `logits` with `bias` added (ids were checked against the vocabulary at submission).
fn with_bias(logits: &[f32], bias: &[(u32, f32)]) -> Vec<f32> {
    let mut out = logits.to_vec();
    for &(id, b) in bias {
        if let Some(l) = out.get_mut(id as usize) {
            *l += b;
        }
    }
    out
}
