//! Training examples, teacher top-k alignment, deterministic ordering and padded batches.
//!
//! Teacher top-k log-probabilities arrive per output token as (token text, logprob) lists
//! from an OpenAI-compatible API. They are mapped to student ids by token text; a position
//! counts as mapped only when the teacher's chosen token is the student's target token at
//! that position (the vocabularies agree there). Unmapped positions fall back to plain
//! cross-entropy and are counted in [`DataStats`].

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::tokenizer::{ChatExample, ChatTokenizer, TokenizerError};

/// One teacher output token with its top-k alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherToken {
    /// The token the teacher emitted, as text.
    pub token: String,
    /// Top-k alternatives as (token text, natural-log probability).
    pub top_logprobs: Vec<(String, f32)>,
}

/// A chat example, optionally with the teacher's per-token top-k log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainExample {
    #[serde(flatten)]
    pub chat: ChatExample,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<Vec<TeacherToken>>,
}

/// Student ids and teacher log-probabilities for one loss position.
pub type TeacherTargets = Vec<(u32, f32)>;

/// A tokenized example ready for batching.
#[derive(Debug, Clone)]
pub struct PreparedExample {
    pub input_ids: Vec<u32>,
    pub assistant_mask: Vec<u8>,
    /// Per input position: the teacher distribution over the token at that position, when
    /// it is an assistant token with a mapped teacher position.
    pub teacher: Vec<Option<TeacherTargets>>,
}

/// What tokenization and teacher alignment dropped or could not map; reported, never silent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    pub examples: usize,
    pub truncated_examples: usize,
    pub truncated_tokens: usize,
    /// Examples whose assistant region was cut away entirely (no loss tokens).
    pub examples_without_targets: usize,
    pub teacher_positions: usize,
    pub teacher_positions_mapped: usize,
    pub teacher_positions_unmapped: usize,
}

/// Tokenizes examples and aligns teacher top-k to student ids.
pub fn prepare_examples(
    tokenizer: &ChatTokenizer,
    examples: &[TrainExample],
    max_seq_len: usize,
) -> Result<(Vec<PreparedExample>, DataStats), TokenizerError> {
    let mut stats = DataStats::default();
    let mut prepared = Vec::with_capacity(examples.len());
    for example in examples {
        let encoded = tokenizer.encode_example(&example.chat, max_seq_len)?;
        stats.examples += 1;
        if encoded.truncated_tokens > 0 {
            stats.truncated_examples += 1;
            stats.truncated_tokens += encoded.truncated_tokens;
        }
        if !encoded.assistant_mask.contains(&1) {
            stats.examples_without_targets += 1;
        }
        let mut teacher = vec![None; encoded.input_ids.len()];
        if let Some(tokens) = &example.teacher {
            stats.teacher_positions += tokens.len();
            let target_start = encoded.assistant_mask.iter().position(|&m| m == 1).unwrap_or(encoded.input_ids.len());
            for (offset, teacher_token) in tokens.iter().enumerate() {
                let position = target_start + offset;
                let student_target = encoded.input_ids.get(position).copied();
                let chosen = tokenizer.id_for_token_text(&teacher_token.token);
                let mapped: TeacherTargets = teacher_token
                    .top_logprobs
                    .iter()
                    .filter_map(|(text, logprob)| tokenizer.id_for_token_text(text).map(|id| (id, *logprob)))
                    .collect();
                if student_target.is_some() && chosen == student_target && !mapped.is_empty() {
                    teacher[position] = Some(mapped);
                    stats.teacher_positions_mapped += 1;
                } else {
                    stats.teacher_positions_unmapped += 1;
                }
            }
        }
        prepared.push(PreparedExample {
            input_ids: encoded.input_ids,
            assistant_mask: encoded.assistant_mask,
            teacher,
        });
    }
    Ok((prepared, stats))
}

/// Example order for `epoch`: a permutation seeded by (seed, epoch), so any step's data is
/// known without replaying earlier steps (what makes resume exact).
pub fn epoch_order(example_count: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..example_count).collect();
    let mixed = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mixed));
    order
}

/// A padded micro-batch. Row `r` of the flattened (b·t) sequence predicts token `r + 1`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (b, t) u32, right-padded.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding, per sequence.
    pub key_padding: Vec<Vec<u32>>,
    /// Flat row indices whose next token is an assistant token.
    pub loss_rows: Vec<u32>,
    /// The next token at each loss row.
    pub labels: Vec<u32>,
    /// For each loss row, the teacher distribution over the label position, if mapped.
    pub teacher: Vec<Option<TeacherTargets>>,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
    /// The hidden states (b·t, hidden) entering decoder layer `.1`, when the layers below
    /// are frozen and their output is cached: the forward pass starts there.
    pub frozen_input: Option<(Tensor, usize)>,
}

/// Pads `examples` to a batch (right padding with `pad_id`).
pub fn make_batch(examples: &[&PreparedExample], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let width = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(examples.len() * width);
    let mut key_padding = Vec::with_capacity(examples.len());
    let mut loss_rows = Vec::new();
    let mut labels = Vec::new();
    let mut teacher = Vec::new();
    let mut tokens = 0;
    for (b, example) in examples.iter().enumerate() {
        let len = example.input_ids.len();
        tokens += len;
        ids.extend_from_slice(&example.input_ids);
        ids.extend(std::iter::repeat_n(pad_id, width - len));
        let mut padding = vec![1u32; len];
        padding.resize(width, 0);
        key_padding.push(padding);
        for position in 1..len {
            if example.assistant_mask[position] == 1 {
                loss_rows.push((b * width + position - 1) as u32);
                labels.push(example.input_ids[position]);
                teacher.push(example.teacher[position].clone());
            }
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (examples.len(), width), device)?,
        key_padding,
        loss_rows,
        labels,
        teacher,
        tokens,
        frozen_input: None,
    })
}
