//! The student model: configuration, the differentiable decoder, LoRA, tokenization,
//! loading/saving Hugging Face directories and tiny test fixtures.

pub mod chat;
pub mod config;
pub mod engine;
pub mod fixture;
pub mod gguf_export;
pub mod gguf_import;
pub mod loading;
pub mod lora;
pub mod qwen;
pub mod tokenizer;
