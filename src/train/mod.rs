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

/// Sets `CANDLE_NUM_THREADS=1` unless the user set it: candle 0.11's element-wise ops run on
/// a spinning barrier pool whose workers busy-wait ~25k spins after every op, stealing the
/// cores its GEMM threads (sized by `RAYON_NUM_THREADS`) need. On a 2-core machine a 135M
/// training step went from 26.6 s to 8.6 s with single-threaded element-wise ops (GEMMs keep
/// both cores). Call it first thing in `main`, before any thread starts and before candle
/// runs an op (the pool is created on first use); the environment is process-global.
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
