//! Chat tokenization with Qwen's ChatML template and assistant-only loss masks.
//!
//! An example renders as
//! `<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`
//! followed by the target and `<|im_end|>`. Only the target tokens and the closing
//! `<|im_end|>` are marked for the loss. Truncation at `max_seq_len` is reported per example,
//! never silent. This module does no training and no tensor work.

use std::path::Path;

use tokenizers::Tokenizer;

/// ChatML markers.
pub const IM_START: &str = "<|im_start|>";
/// ChatML end-of-turn marker; also the generation stop token.
pub const IM_END: &str = "<|im_end|>";
/// Qwen's end-of-text token, used for padding.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Errors loading a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer has no {0} token\nhint: a ChatML (Qwen-style) tokenizer.json is required")]
    MissingSpecialToken(&'static str),
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("cannot save tokenizer to {path}: {message}")]
    Save { path: String, message: String },
}

/// One chat turn to learn: an optional system prompt, a user prompt and the target answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatExample {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub prompt: String,
    pub target: String,
}

/// An encoded example: `assistant_mask[j] == 1` marks token `j` as an assistant token
/// (a loss target).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedExample {
    pub input_ids: Vec<u32>,
    pub assistant_mask: Vec<u8>,
    /// Tokens dropped to fit `max_seq_len` (0 when it fit).
    pub truncated_tokens: usize,
}

/// A tokenizer with the ChatML special tokens resolved.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    im_start: u32,
    im_end: u32,
    pad: u32,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("im_start", &self.im_start)
            .field("im_end", &self.im_end)
            .field("pad", &self.pad)
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() })?;
        Self::new(tokenizer)
    }

    /// Wraps a loaded tokenizer; fails when the ChatML tokens are missing.
    pub fn new(tokenizer: Tokenizer) -> Result<Self, TokenizerError> {
        let im_start = tokenizer.token_to_id(IM_START).ok_or(TokenizerError::MissingSpecialToken(IM_START))?;
        let im_end = tokenizer.token_to_id(IM_END).ok_or(TokenizerError::MissingSpecialToken(IM_END))?;
        let pad = tokenizer.token_to_id(END_OF_TEXT).unwrap_or(im_end);
        Ok(Self { tokenizer, im_start, im_end, pad })
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.tokenizer
            .save(path, false)
            .map_err(|e| TokenizerError::Save { path: path.display().to_string(), message: e.to_string() })
    }

    /// The `<|im_end|>` id (stop token for generation).
    pub fn im_end_id(&self) -> u32 {
        self.im_end
    }

    /// The `<|im_start|>` id.
    pub fn im_start_id(&self) -> u32 {
        self.im_start
    }

    /// The id used for padding (`<|endoftext|>`, else `<|im_end|>`).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes text, parsing special tokens, adding none.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids, keeping special tokens when `skip_special` is false.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The ChatML prompt up to and including `<|im_start|>assistant\n`.
    pub fn render_prompt(system: Option<&str>, prompt: &str) -> String {
        let mut text = String::new();
        if let Some(system) = system {
            text.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
        }
        text.push_str(&format!("{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"));
        text
    }

    /// Prompt token ids for generation.
    pub fn encode_prompt(&self, system: Option<&str>, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&Self::render_prompt(system, prompt))
    }

    /// Encodes a training example; the target plus `<|im_end|>` is the loss region.
    /// Sequences longer than `max_seq_len` are cut at the end and the cut is reported.
    pub fn encode_example(&self, example: &ChatExample, max_seq_len: usize) -> Result<EncodedExample, TokenizerError> {
        let prompt = self.encode_prompt(example.system.as_deref(), &example.prompt)?;
        let mut target = self.encode(&example.target)?;
        target.push(self.im_end);
        let mut input_ids = prompt.clone();
        input_ids.extend_from_slice(&target);
        let mut assistant_mask = vec![0u8; prompt.len()];
        assistant_mask.extend(std::iter::repeat_n(1u8, target.len()));
        let truncated_tokens = input_ids.len().saturating_sub(max_seq_len);
        input_ids.truncate(max_seq_len);
        assistant_mask.truncate(max_seq_len);
        Ok(EncodedExample { input_ids, assistant_mask, truncated_tokens })
    }

    /// The id of a token given as text, as OpenAI-compatible APIs return it (decoded text,
    /// e.g. `" hello"`), or as the vocabulary spells it (byte-level, e.g. `"Ġhello"`).
    pub fn id_for_token_text(&self, text: &str) -> Option<u32> {
        if let Some(id) = self.tokenizer.token_to_id(text) {
            return Some(id);
        }
        let byte_level: String = text.bytes().map(byte_to_unicode).collect();
        self.tokenizer.token_to_id(&byte_level)
    }
}

/// GPT-2's byte-to-unicode map used by byte-level BPE vocabularies (Qwen, Llama 3, SmolLM):
/// printable bytes map to themselves, the rest to code points from 256 up.
pub fn byte_to_unicode(byte: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(byte) {
        return char::from(byte);
    }
    let shift = (0..byte).filter(|&b| !printable(b)).count() as u32;
    // 256 + shift is at most 256 + 68, always a valid scalar value.
    char::from_u32(256 + shift).unwrap_or('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_to_unicode_matches_gpt2_table() {
        assert_eq!(byte_to_unicode(b' '), 'Ġ');
        assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
        assert_eq!(byte_to_unicode(b'a'), 'a');
        assert_eq!(byte_to_unicode(0), 'Ā');
    }

    #[test]
    fn prompt_template_is_chatml() {
        let text = ChatTokenizer::render_prompt(Some("Be brief."), "Hi");
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
