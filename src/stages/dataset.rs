//! The `dataset` and `split` stages.

use super::{stage_config, FingerprintContext, StageContext, StageError, StageExecutor, StageOutcome};
use crate::dataset::{self, Example};
use crate::fsutil;
use crate::graph::Stage;
use crate::spec::{resolve_against, DatasetFormat};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const EXAMPLES_FILE: &str = "examples.jsonl";
pub const TRAIN_FILE: &str = "train.jsonl";
pub const EVAL_FILE: &str = "eval.jsonl";

#[derive(Deserialize)]
struct DatasetConfig {
    path: String,
    format: Option<DatasetFormat>,
    prompt_column: String,
    reference_column: String,
}

fn dataset_path(stage: &Stage, spec_dir: &Path) -> Result<PathBuf, StageError> {
    let c: DatasetConfig = stage_config(stage)?;
    Ok(resolve_against(spec_dir, &c.path))
}

/// Reads, validates and de-duplicates the dataset file.
pub struct LoadExamples;

impl StageExecutor for LoadExamples {
    fn logic_version(&self) -> u32 {
        1
    }

    fn fingerprint(&self, stage: &Stage, ctx: &FingerprintContext) -> Result<Value, StageError> {
        let path = dataset_path(stage, ctx.spec_dir)?;
        let hash = fsutil::sha256_file(&path)
            .map_err(|e| StageError::io(format!("cannot read the dataset {}", path.display()), e))?;
        Ok(json!({ "dataset_sha256": hash }))
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: DatasetConfig = stage_config(stage)?;
        let path = resolve_against(&ctx.spec_dir, &c.path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| StageError::io(format!("cannot read the dataset {}", path.display()), e))?;
        let is_csv = match c.format {
            Some(DatasetFormat::Csv) => true,
            Some(DatasetFormat::Jsonl) => false,
            None => c.path.to_ascii_lowercase().ends_with(".csv"),
        };
        let parsed = if is_csv {
            dataset::parse_csv(&text, &c.prompt_column, &c.reference_column)
        } else {
            dataset::parse_jsonl(&text)
        };
        let parsed = parsed.map_err(|errors| {
            let lines: Vec<String> = errors
                .iter()
                .map(|e| format!("{}:{}: {}\n  = hint: {}", path.display(), e.line, e.message, e.hint))
                .collect();
            StageError::Failed(format!("the dataset has {} bad row(s):\n{}", errors.len(), lines.join("\n")))
        })?;
        write_examples(&ctx.out_dir.join(EXAMPLES_FILE), &parsed.examples)?;
        let with_reference = parsed.examples.iter().filter(|e| e.reference.is_some()).count();
        Ok(StageOutcome {
            summary: json!({
                "rows": parsed.rows,
                "examples": parsed.examples.len(),
                "duplicates": parsed.duplicates,
                "with_reference": with_reference,
            }),
            halt: None,
        })
    }
}

/// Splits examples into train and eval by a seeded hash.
pub struct SplitExamples;

#[derive(Deserialize)]
struct SplitConfig {
    eval_fraction: f64,
    seed: u64,
}

impl StageExecutor for SplitExamples {
    fn logic_version(&self) -> u32 {
        1
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: SplitConfig = stage_config(stage)?;
        let input = ctx.require_input("examples")?;
        let examples = read_examples(&input.dir.join(EXAMPLES_FILE))?;
        let (train, eval) = dataset::split(&examples, c.eval_fraction, c.seed);
        if eval.is_empty() {
            ctx.progress.warn(&format!(
                "no example fell into the eval set ({} examples, eval_fraction {}); add examples or raise the fraction",
                examples.len(),
                c.eval_fraction
            ));
        }
        write_examples(&ctx.out_dir.join(TRAIN_FILE), &train)?;
        write_examples(&ctx.out_dir.join(EVAL_FILE), &eval)?;
        Ok(StageOutcome { summary: json!({ "train": train.len(), "eval": eval.len() }), halt: None })
    }
}

pub fn write_examples(path: &Path, examples: &[Example]) -> Result<(), StageError> {
    let mut out = Vec::new();
    for e in examples {
        serde_json::to_writer(&mut out, e).map_err(|e| StageError::Failed(format!("cannot encode an example: {e}")))?;
        out.write_all(b"\n").map_err(|e| StageError::io("cannot encode examples", e))?;
    }
    std::fs::write(path, out).map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}

pub fn read_examples(path: &Path) -> Result<Vec<Example>, StageError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| StageError::Failed(format!("{} is damaged: {e}", path.display()))))
        .collect()
}
