//! Fine-tuning: full or LoRA, SFT cross-entropy or token-level distillation, fused AdamW,
//! warm-up + cosine schedule, accumulation, clipping, checkpoints with exact resume.

pub mod data;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use data::{DataStats, TeacherToken, TrainExample};
pub use loss::KdConfig;
pub use optim::{AdamWParams, FusedAdamW};
pub use schedule::LrSchedule;
pub use trainer::{evaluate_loss, Progress, StopReason, TrainConfig, TrainError, TrainOutcome, Trainer};
