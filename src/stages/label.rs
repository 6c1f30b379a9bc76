//! The `label-train` / `label-eval` stages: the teacher answers every prompt of one side of
//! the split, through the router, with every completed call journaled before it counts.
//!
//! Where paid work lives: one journal per side of the split under `labels/answers/`,
//! shared by every pipeline of the state directory. A record is keyed by the request's
//! content (messages and params) and names the provider and model that answered, so an
//! answer is reused whenever the same request goes to a teacher whose targets still include
//! that model — whatever the budget, the concurrency, the rate limits, or the fallbacks
//! added, removed or reordered around it. Journals of older tangles (`labels/<hash>/`, one
//! per ordered target list) are read as well, never written.

use super::{stage_config, StageContext, StageError, StageExecutor, StageOutcome};
use crate::budget::Spend;
use crate::dataset::Example;
use crate::graph::Stage;
use crate::label::{self, journal::JournalRecord, Durability, LabelJob, LabelJournal, LabelOutcome, LabelSettings};
use crate::launch;
use crate::ledger::Ledger;
use crate::providers::config::{self as pc, TargetConfig};
use crate::providers::{ChatMessage, ChatRequest, RequestId, Role, TokenLogprobs};
use crate::router::{Router, RouterPolicy};
use crate::spec::TeacherSpec;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const LABELS_FILE: &str = "labels.jsonl";

#[derive(Deserialize)]
struct LabelConfig {
    part: String,
}

/// One teacher answer, as later stages read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelRow {
    /// The example's id.
    pub id: String,
    pub request_id: RequestId,
    pub text: String,
    pub target: String,
    pub model: String,
    pub latency_ms: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

pub fn read_labels(path: &Path) -> Result<Vec<LabelRow>, StageError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| StageError::Failed(format!("{}:{}: not a label row: {e}", path.display(), i + 1)))
        })
        .collect()
}

pub struct LabelStage;

/// The request the teacher gets for an example: the teacher's system prompt (unless the
/// example brings its own) and the example's conversation, with the spec's params.
pub fn teacher_request(teacher: &TeacherSpec, example: &Example) -> ChatRequest {
    let mut messages = Vec::with_capacity(example.messages.len() + 1);
    let has_system = example.messages.iter().any(|m| m.role == "system");
    if let (Some(system), false) = (&teacher.system, has_system) {
        messages.push(ChatMessage::system(system.clone()));
    }
    for m in &example.messages {
        let role = match m.role.as_str() {
            "system" => Role::System,
            "assistant" => Role::Assistant,
            _ => Role::User,
        };
        messages.push(ChatMessage { role, content: m.content.clone() });
    }
    let p = &teacher.params;
    let params = pc::GenerationParams {
        temperature: p.temperature.map(|t| t as f32),
        max_tokens: p.max_tokens,
        top_p: p.top_p.map(|t| t as f32),
        stop: p.stop.clone().unwrap_or_default(),
        logprobs: teacher.logprobs.map(|k| k.min(20) as u8),
        seed: p.seed,
    };
    ChatRequest::new(messages, params)
}

/// The directory holding the journals every teacher writes: one file per split side, so
/// the two label stages never append to the same file.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("labels").join(ANSWERS_DIR)
}

const ANSWERS_DIR: &str = "answers";

/// Where in `teacher.targets` the teacher that wrote `record` is, if it is still there. A
/// record from before providers were journaled matches on its model alone.
fn answering_target(teacher: &TeacherSpec, record: &JournalRecord) -> Option<usize> {
    teacher
        .targets
        .iter()
        .position(|t| t.model == record.model && record.provider.as_deref().is_none_or(|p| p == t.provider.as_str()))
}

/// Every journal file of the state directory: the shared answers and the legacy per-target
/// list directories of older tangles.
fn journal_files(state_dir: &Path) -> Result<Vec<PathBuf>, StageError> {
    let root = state_dir.join("labels");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StageError::io(format!("cannot list {}", root.display()), e)),
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    // The shared directory first: on a tie its answer wins over a legacy copy.
    dirs.sort_by_key(|d| (d.file_name().is_none_or(|n| n != ANSWERS_DIR), d.clone()));
    let mut files = Vec::new();
    for dir in dirs {
        for part in ["train", "eval"] {
            let file = dir.join(format!("{part}.jsonl"));
            if file.is_file() {
                files.push(file);
            }
        }
    }
    Ok(files)
}

/// The answers this teacher may reuse, one per request: among records from a model still
/// in its targets, the one from the earliest target.
fn reusable_answers(state_dir: &Path, teacher: &TeacherSpec) -> Result<HashMap<RequestId, JournalRecord>, StageError> {
    let mut best: HashMap<RequestId, (usize, JournalRecord)> = HashMap::new();
    for file in journal_files(state_dir)? {
        let records = LabelJournal::read_all(&file)
            .map_err(|e| StageError::Failed(format!("cannot read the label journal: {e}")))?;
        for record in records {
            let Some(rank) = answering_target(teacher, &record) else { continue };
            match best.get(&record.id) {
                Some((kept, _)) if *kept <= rank => {}
                _ => {
                    best.insert(record.id.clone(), (rank, record));
                }
            }
        }
    }
    Ok(best.into_iter().map(|(id, (_, record))| (id, record)).collect())
}

/// How one side of the split is labeled: the calls in flight (the eval side may have its
/// own bound, for latencies the report compares), the budget, and the output size budget
/// reservations assume.
pub fn label_settings(teacher: &TeacherSpec, part: &str, run_id: &str, stage: &str) -> LabelSettings {
    let concurrency = match part {
        "eval" => teacher.eval_concurrency.unwrap_or(teacher.concurrency),
        _ => teacher.concurrency,
    };
    let mut settings = LabelSettings::new(run_id, stage, concurrency as usize);
    settings.budget = teacher.budget.unwrap_or_default();
    if let Some(m) = teacher.params.max_tokens {
        settings.default_max_output_tokens = m;
    }
    settings
}

/// The router's targets for this teacher, in failover order: each spec target with the
/// teacher-wide timeout, retries, rate limits and (unless the target has its own) pricing.
pub fn target_configs(teacher: &TeacherSpec) -> Vec<TargetConfig> {
    teacher
        .targets
        .iter()
        .map(|t| {
            let mut c = TargetConfig::new(t.provider, t.model.clone());
            c.api_key = t.api_key.clone();
            c.base_url = t.base_url.clone();
            c.timeout = Duration::from_secs_f64(teacher.timeout_s);
            c.max_retries = teacher.max_retries;
            c.pricing = t.pricing.or(teacher.pricing);
            c.rate_limits = teacher.rate_limits;
            c
        })
        .collect()
}

/// Label stages of one teacher run one at a time: `teacher.concurrency` bounds the calls in
/// flight to the teacher, not per stage, and the budget is checked against one total.
fn teacher_lock(dir: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = crate::support::lock(LOCKS.get_or_init(Default::default));
    Arc::clone(locks.entry(dir.to_path_buf()).or_default())
}

impl StageExecutor for LabelStage {
    fn logic_version(&self) -> u32 {
        1
    }

    fn execute(&self, stage: &Stage, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let c: LabelConfig = stage_config(stage)?;
        let spec =
            ctx.spec.as_ref().ok_or_else(|| StageError::Failed("internal: the label stage needs the spec".into()))?;
        let teacher = spec.spec.teacher.as_ref().ok_or_else(|| StageError::Failed("internal: no teacher".into()))?;
        let split = ctx.require_input("split")?;
        let examples_of = |part: &str| super::dataset::read_examples(&split.dir.join(format!("{part}.jsonl")));
        let examples = examples_of(&c.part)?;
        let requests: Vec<ChatRequest> = examples.iter().map(|e| teacher_request(teacher, e)).collect();
        let request_ids: Vec<RequestId> = requests.iter().map(ChatRequest::content_id).collect();

        let dir = journal_dir(&ctx.state_dir);
        let lock = teacher_lock(&dir);
        let _serialized = crate::support::lock(&lock);
        let journal_path = dir.join(format!("{}.jsonl", c.part));

        // Opened (locked, its torn tail repaired) before anything is read from the journals.
        let (journal, contents) = LabelJournal::open(&journal_path, Durability::Fsync)
            .map_err(|e| StageError::Failed(format!("cannot open the label journal: {e}")))?;
        let journal = Arc::new(journal);
        if contents.truncated_bytes > 0 {
            ctx.progress.warn(&format!(
                "{}: cut {} bytes of a torn last line (a call in flight at a crash; it is sent again)",
                journal_path.display(),
                contents.truncated_bytes
            ));
        }
        let reusable = reusable_answers(&ctx.state_dir, teacher)?;

        // Spend so far on this pipeline's prompts (both sides of the split), from the journals:
        // a re-run with the same budget stops again, a raised budget resumes.
        let mut pipeline_ids: HashSet<RequestId> = request_ids.iter().cloned().collect();
        let other = if c.part == "train" { "eval" } else { "train" };
        if let Ok(other_examples) = examples_of(other) {
            pipeline_ids.extend(other_examples.iter().map(|e| teacher_request(teacher, e).content_id()));
        }
        let mut already_spent = Spend::default();
        for (id, record) in &reusable {
            if pipeline_ids.contains(id) {
                already_spent.tokens += record.response.usage.total();
                already_spent.cost_usd += record.cost_usd;
            }
        }
        let already_done: HashSet<RequestId> = reusable.keys().cloned().collect();
        let missing = request_ids.iter().filter(|id| !already_done.contains(*id)).collect::<HashSet<_>>().len();

        let cancel = ctx.cancel.clone();
        let result = ctx.runtime.block_on(async {
            let mut launched = false;
            if missing > 0 {
                for t in &teacher.targets {
                    let (Some(launch_spec), Some(base_url)) = (&t.launch, &t.base_url) else { continue };
                    if !launch::is_running(base_url) {
                        ctx.progress.set_message(format!("starting the teacher server at {base_url}"));
                    }
                    ctx.launch_server(base_url, launch_spec).await?;
                    launched = true;
                }
            }
            let router = Router::new(target_configs(teacher), RouterPolicy::default())
                .map_err(|e| StageError::Failed(format!("teacher targets: {e}")))?;
            let ledger = Ledger::open(&ctx.state_dir.join("ledger.sqlite"))
                .map_err(|e| StageError::Failed(format!("cannot open the token ledger: {e}")))?;
            let mut settings = label_settings(teacher, &c.part, &ctx.run_id, &stage.name);
            settings.already_spent = already_spent;
            ctx.progress.set_length(requests.len() as u64);
            ctx.progress.set_message(if missing > 0 { "labeling".to_string() } else { "all journaled".into() });
            let bar = ctx.progress.clone();
            let report = label::label(LabelJob {
                requests: requests.clone(),
                router: Arc::new(router),
                journal: Arc::clone(&journal),
                already_done,
                ledger: Some(Arc::new(ledger)),
                settings,
                progress: Some(Arc::new(move |p: &label::Progress| {
                    bar.set_position(p.completed() as u64);
                    bar.set_message(format!("{:.1} req/s, ${:.4}", p.requests_per_sec(), p.cost_usd));
                })),
                cancel,
            })
            .await
            .map_err(|e| StageError::Failed(format!("labeling failed: {e}")))?;
            Ok::<_, StageError>((report, launched))
        });
        let (report, launched) = result?;

        match &report.outcome {
            LabelOutcome::Completed => {}
            LabelOutcome::Cancelled => return Err(StageError::Cancelled),
            LabelOutcome::BudgetExhausted(exceeded) => {
                return Err(StageError::Stopped(format!(
                    "teacher budget exhausted after {} of {} labels ({exceeded}); every paid answer is journaled — raise `teacher.budget` and run again to label the other {}",
                    report.progress.completed(),
                    requests.len(),
                    requests.len() - report.progress.completed()
                )))
            }
            LabelOutcome::CompletedWithFailures => {
                let (id, why) = report.failures.first().cloned().unwrap_or_default();
                let example = request_ids.iter().position(|r| *r == id).map(|i| examples[i].id.as_str()).unwrap_or("?");
                return Err(StageError::Failed(format!(
                    "{} of {} prompts failed on every teacher target (first: example {example}: {why}); the {} answered are journaled and a re-run sends only the failed ones",
                    report.failures.len(),
                    requests.len(),
                    report.progress.completed()
                )));
            }
        }

        drop(journal); // flushed and unlocked: every answer of this stage is on disk
        let records = reusable_answers(&ctx.state_dir, teacher)?;
        let out = ctx.out_dir.join(LABELS_FILE);
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&out).map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?,
        );
        let (mut input_tokens, mut output_tokens, mut cost) = (0u64, 0u64, 0f64);
        for (example, id) in examples.iter().zip(&request_ids) {
            let record = records.get(id).ok_or_else(|| {
                StageError::Failed(format!("internal: example {} is labeled but not in the journal", example.id))
            })?;
            input_tokens += record.response.usage.input_tokens;
            output_tokens += record.response.usage.output_tokens;
            cost += record.cost_usd;
            let row = LabelRow {
                id: example.id.clone(),
                request_id: id.clone(),
                text: record.response.text.clone(),
                target: record.target.clone(),
                model: record.model.clone(),
                latency_ms: record.latency_ms,
                cost_usd: record.cost_usd,
                input_tokens: record.response.usage.input_tokens,
                output_tokens: record.response.usage.output_tokens,
                logprobs: record.response.logprobs.clone(),
            };
            let line = serde_json::to_string(&row).map_err(|e| StageError::Failed(e.to_string()))?;
            writeln!(file, "{line}").map_err(|e| StageError::io(format!("cannot write {}", out.display()), e))?;
        }
        file.flush().map_err(|e| StageError::io(format!("cannot write {}", out.display()), e))?;
        let p = &report.progress;
        ctx.progress.finish(&format!(
            "{} labels ({} new, {} from the journal), {} tokens, ${:.4}",
            examples.len(),
            p.done,
            p.resumed,
            input_tokens + output_tokens,
            cost
        ));
        Ok(StageOutcome {
            summary: json!({
                "labels": examples.len(),
                "labeled_now": p.done,
                "from_journal": p.resumed,
                "failed_attempts": p.failed_attempts,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cost_usd": cost,
                "teacher_launched": launched,
                "journal": journal_path.display().to_string(),
            }),
            halt: None,
        })
    }
}
