//! The labeling engine end to end against the mock: de-duplication, resume, budget stop
//! and resume, cancellation, concurrency bound, ledger rows, and secrets in no output.

use crate::teacher_common as common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tangle::budget::BudgetExceeded;
use tangle::label::{
    label, labels_in_order, CancelToken, Durability, LabelJob, LabelJournal, LabelOutcome, LabelReport, LabelSettings,
    Progress,
};
use tangle::ledger::{GroupBy, Ledger, UsageFilter};
use tangle::mock::{default_answer, Fault, MockConfig};
use tangle::providers::config::{Budget, Pricing};
use tangle::providers::ChatRequest;
use tangle::router::Router;

struct Run {
    report: LabelReport,
    progress_calls: Vec<Progress>,
}

async fn run_label(
    requests: Vec<ChatRequest>,
    router: Arc<Router>,
    journal_path: &Path,
    ledger: Option<Arc<Ledger>>,
    settings: LabelSettings,
    cancel: CancelToken,
) -> Run {
    let (journal, contents) = LabelJournal::open(journal_path, Durability::Fsync).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let report = label(LabelJob {
        requests,
        router,
        journal: Arc::new(journal),
        already_done: contents.records.keys().cloned().collect(),
        ledger,
        settings,
        progress: Some(Arc::new(move |p: &Progress| sink.lock().unwrap().push(p.clone()))),
        cancel,
    })
    .await
    .unwrap();
    let progress_calls = seen.lock().unwrap().clone();
    Run { report, progress_calls }
}

fn prompts(n: usize) -> Vec<ChatRequest> {
    (0..n).map(|i| request(&format!("question {i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_journaled_requests_are_never_sent_again() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("label_train.jsonl");
    let router = router(vec![openai_target(&mock, "a")], fast_policy());
    // 30 unique prompts, each twice.
    let mut requests = prompts(30);
    requests.extend(prompts(30));
    let run = run_label(
        requests.clone(),
        router.clone(),
        &journal,
        None,
        LabelSettings::new("r", "s", 8),
        CancelToken::new(),
    )
    .await;
    assert_eq!(run.report.outcome, LabelOutcome::Completed);
    assert_eq!(run.report.progress.total, 30);
    assert_eq!(run.report.progress.done, 30);
    assert_eq!(mock.counts().total, 30, "each unique prompt sent exactly once");
    let sent: HashSet<String> = mock.received_prompts().into_iter().collect();
    assert_eq!(sent.len(), 30);
    assert_eq!(run.progress_calls.len(), 30);
    assert_eq!(run.progress_calls.iter().map(|p| p.done).max(), Some(30));

    // Labels come back in input order, duplicates sharing an answer.
    let records = LabelJournal::read(&journal).unwrap();
    let labels = labels_in_order(&run.report.request_ids, &records);
    assert_eq!(labels.len(), 60);
    assert_eq!(labels[7].as_deref(), Some(default_answer("question 7").as_str()));
    assert_eq!(labels[37], labels[7]);

    // Re-running is free: everything is resumed from the journal.
    let again = run_label(requests, router, &journal, None, LabelSettings::new("r", "s", 8), CancelToken::new()).await;
    assert_eq!(again.report.outcome, LabelOutcome::Completed);
    assert_eq!(again.report.progress.resumed, 30);
    assert_eq!(again.report.progress.done, 0);
    assert_eq!(mock.counts().total, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let mock = mock_with(MockConfig { base_latency: Duration::from_millis(20), ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let router = router(vec![openai_target(&mock, "a")], fast_policy());
    let run = run_label(
        prompts(80),
        router,
        &dir.path().join("j"),
        None,
        LabelSettings::new("r", "s", 6),
        CancelToken::new(),
    )
    .await;
    assert_eq!(run.report.progress.done, 80);
    let max = mock.counts().max_in_flight;
    assert!(max <= 6, "max in flight {max}");
    assert!(max >= 4, "concurrency not used: {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_stops_cleanly_and_resumes_when_raised() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger.db")).unwrap());
    let mut target = openai_target(&mock, "a");
    // 1 USD per input token and per output token: a call costs 5 + 2 = 7 USD actual
    // (mock input = words of "system: Classify.\nuser: question N");
    // the reservation assumes max_tokens (16) of output: ~ (est. input + 16) USD.
    target.pricing = Some(Pricing { input_per_mtok: 1e6, output_per_mtok: 1e6 });
    let router = router(vec![target], fast_policy());
    let mut settings = LabelSettings::new("run1", "label_train", 1);
    settings.budget = Budget { max_tokens: None, max_cost_usd: Some(100.0) };
    let run =
        run_label(prompts(20), router.clone(), &journal, Some(ledger.clone()), settings, CancelToken::new()).await;
    let LabelOutcome::BudgetExhausted(BudgetExceeded::Cost { limit, .. }) = run.report.outcome else {
        panic!("expected budget stop, got {:?}", run.report.outcome);
    };
    assert_eq!(limit, 100.0);
    let done = run.report.progress.done;
    assert!((3..20).contains(&done), "done {done}");
    assert!(run.report.progress.cost_usd <= 100.0, "never overspends: {}", run.report.progress.cost_usd);
    assert_eq!(LabelJournal::read(&journal).unwrap().len(), done);
    assert_eq!(mock.counts().total as usize, done, "no call was made past the budget");

    // Raise the budget, carry the spend from the ledger: the rest completes, nothing twice.
    let (tokens, cost) = ledger.spent("run1", "label_train").unwrap();
    assert!((cost - run.report.progress.cost_usd).abs() < 1e-9);
    let mut settings = LabelSettings::new("run1", "label_train", 4);
    settings.budget = Budget { max_tokens: None, max_cost_usd: Some(1000.0) };
    settings.already_spent = tangle::budget::Spend { tokens, cost_usd: cost };
    let run2 = run_label(prompts(20), router, &journal, Some(ledger.clone()), settings, CancelToken::new()).await;
    assert_eq!(run2.report.outcome, LabelOutcome::Completed);
    assert_eq!(run2.report.progress.resumed, done);
    assert_eq!(mock.counts().total, 20);
    let totals = ledger.totals(GroupBy::Run, &UsageFilter::default()).unwrap();
    assert_eq!(totals[0].calls, 20);
    assert!((totals[0].cost_usd - 20.0 * 7.0).abs() < 1e-6, "{}", totals[0].cost_usd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_also_stops() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let router = router(vec![openai_target(&mock, "a")], fast_policy());
    let mut settings = LabelSettings::new("r", "s", 2);
    settings.budget = Budget { max_tokens: Some(200), max_cost_usd: None };
    let run = run_label(prompts(50), router, &dir.path().join("j"), None, settings, CancelToken::new()).await;
    assert!(matches!(run.report.outcome, LabelOutcome::BudgetExhausted(BudgetExceeded::Tokens { .. })));
    let p = &run.report.progress;
    assert!(p.input_tokens + p.output_tokens <= 200);
    assert!(p.done > 0 && p.done < 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_journals_in_flight_calls() {
    let mock = mock_with(MockConfig { base_latency: Duration::from_millis(300), ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let router = router(vec![openai_target(&mock, "a")], fast_policy());
    let cancel = CancelToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let run = run_label(prompts(40), router, &journal, None, LabelSettings::new("r", "s", 4), cancel).await;
    assert_eq!(run.report.outcome, LabelOutcome::Cancelled);
    // Exactly the 4 calls in flight at the cancel were sent, completed and journaled.
    assert_eq!(mock.counts().total, 4);
    assert_eq!(run.report.progress.done, 4);
    assert_eq!(LabelJournal::read(&journal).unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_reported_and_retried_on_rerun() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let ledger = Arc::new(Ledger::open_in_memory().unwrap());
    let mut t = openai_target(&mock, "a");
    t.max_retries = 1;
    let router = router(vec![t], fast_policy());
    // First request's two attempts fail; one later request gets a 429 then succeeds.
    mock.push_faults([Fault::ServerError, Fault::ServerError, Fault::RateLimited { retry_after: None }]);
    let run = run_label(
        prompts(10),
        router.clone(),
        &journal,
        Some(ledger.clone()),
        LabelSettings::new("r", "s", 1),
        CancelToken::new(),
    )
    .await;
    assert_eq!(run.report.outcome, LabelOutcome::CompletedWithFailures);
    assert_eq!(run.report.progress.failed, 1);
    assert_eq!(run.report.progress.done, 9);
    assert_eq!(run.report.progress.failed_attempts, 3);
    assert_eq!(run.report.failures.len(), 1);
    assert_eq!(ledger.call_count().unwrap(), 12, "every attempt has a ledger row");
    let by_target = ledger.totals(GroupBy::Target, &UsageFilter::default()).unwrap();
    assert_eq!(by_target[0].failed_calls, 3);

    let rerun =
        run_label(prompts(10), router, &journal, Some(ledger), LabelSettings::new("r", "s", 1), CancelToken::new())
            .await;
    assert_eq!(rerun.report.outcome, LabelOutcome::Completed);
    assert_eq!(rerun.report.progress.done, 1);
    assert_eq!(mock.counts().total, 13);
}

/// Collects everything written through `tracing` at every level.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_appear_in_no_output() {
    const GOOD: &str = "sk-GOOD-c0ffee-123456";
    const WRONG: &str = "sk-WRONG-deadbeef-654321";
    let sink = LogSink::default();
    let writer = sink.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    // Global: labeling tasks run on the runtime's worker threads. Only this test installs one.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let (primary, secondary) = (
        mock_with(MockConfig { expected_api_key: Some(GOOD.into()), ..Default::default() }).await,
        mock_with(MockConfig { expected_api_key: Some(GOOD.into()), ..Default::default() }).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let ledger_path = dir.path().join("ledger.db");
    let ledger = Arc::new(Ledger::open(&ledger_path).unwrap());
    // The primary has a wrong key (the mock echoes it back in its 401 body); the secondary
    // has the right one and sees faults too.
    let targets =
        vec![with_key(openai_target(&primary, "a"), WRONG), with_key(anthropic_target(&secondary, "b"), GOOD)];
    let debug_config = format!("{targets:?}");
    let json_config = serde_json::to_string(&targets).unwrap();
    let router = router(targets, fast_policy());
    secondary.push_faults([Fault::ServerError, Fault::MalformedJson]);
    let run = run_label(
        prompts(5),
        router.clone(),
        &journal,
        Some(ledger.clone()),
        LabelSettings::new("r", "s", 2),
        CancelToken::new(),
    )
    .await;
    assert_eq!(run.report.progress.done, 5);
    // And one request that fails everywhere, to get a final error string.
    primary.set_sticky_fault(None);
    secondary.set_sticky_fault(Some(Fault::Status(403)));
    let failure = router.send(&request("fails")).await.unwrap_err();
    let error_text = format!("{failure} {failure:?}");
    assert!(error_text.contains("***"), "the echoed key was redacted: {error_text}");
    drop(ledger);

    let mut outputs = vec![
        ("journal", std::fs::read(&journal).unwrap()),
        ("error", error_text.into_bytes()),
        ("debug config", debug_config.into_bytes()),
        ("json config", json_config.into_bytes()),
        ("report", format!("{:?}", run.report).into_bytes()),
        ("logs", sink.0.lock().unwrap().clone()),
    ];
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("ledger.db") {
            outputs.push(("ledger file", std::fs::read(&path).unwrap()));
        }
    }
    assert!(outputs.iter().any(|(n, b)| *n == "logs" && !b.is_empty()), "logs were captured");
    assert!(outputs.iter().any(|(n, _)| *n == "ledger file"));
    for (name, bytes) in &outputs {
        let text = String::from_utf8_lossy(bytes);
        for key in [GOOD, WRONG] {
            assert!(!text.contains(key), "{name} contains an API key");
            // Also no recognisable fragment of it.
            assert!(!text.contains(&key[3..15]), "{name} contains part of an API key");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_faults_still_label_everything_exactly_once() {
    let mock = mock_with(MockConfig {
        fault_rates: vec![
            (Fault::ServerError, 0.08),
            (Fault::Overloaded, 0.05),
            (Fault::RateLimited { retry_after: Some("0".into()) }, 0.05),
            (Fault::ConnectionReset, 0.05),
            (Fault::TruncatedBody, 0.05),
            (Fault::MalformedJson, 0.05),
        ],
        seed: 7,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let mut t = openai_target(&mock, "a");
    t.max_retries = 8;
    t.stream = true;
    let router = router(vec![t], fast_policy());
    let run =
        run_label(prompts(200), router, &journal, None, LabelSettings::new("r", "s", 16), CancelToken::new()).await;
    assert_eq!(run.report.outcome, LabelOutcome::Completed, "{:?}", run.report.failures.first());
    let counts = mock.counts();
    let injected: u64 = counts.faults.values().sum();
    assert!(injected > 30, "faults were injected: {counts:?}");
    // Every prompt got exactly one good answer, and that answer is what was journaled.
    assert_eq!(counts.ok, 200);
    assert_eq!(counts.total, 200 + injected);
    assert_eq!(run.report.progress.failed_attempts as u64, injected);
    let records = LabelJournal::read(&journal).unwrap();
    let labels = labels_in_order(&run.report.request_ids, &records);
    for (i, label) in labels.iter().enumerate() {
        assert_eq!(label.as_deref(), Some(default_answer(&format!("question {i}")).as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_snapshots_are_monotonic_and_complete() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut t = openai_target(&mock, "a");
    t.pricing = Some(Pricing { input_per_mtok: 1.0, output_per_mtok: 2.0 });
    let router = router(vec![t], fast_policy());
    let run = run_label(
        prompts(100),
        router,
        &dir.path().join("j"),
        None,
        LabelSettings::new("r", "s", 16),
        CancelToken::new(),
    )
    .await;
    let dones: Vec<usize> = run.progress_calls.iter().map(|p| p.done).collect();
    assert_eq!(dones, (1..=100).collect::<Vec<_>>());
    let last = run.progress_calls.last().unwrap();
    assert_eq!(last.total, 100);
    assert_eq!((last.input_tokens, last.output_tokens), (500, 200));
    assert!((last.cost_usd - (500.0 * 1.0 + 200.0 * 2.0) / 1e6).abs() < 1e-12);
    assert!(last.requests_per_sec() > 0.0 && last.tokens_per_sec() > 0.0);
    assert_eq!(run.report.progress.done, 100);
}

/// Labeling through a Gemini teacher that fails under load (429s, 503s, resets, cut
/// streams): every prompt is labeled once, every answer is journaled with the provider and
/// model that gave it, and a re-run sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_teacher_under_faults_labels_each_prompt_once_and_journals_who_answered() {
    let mock = mock_with(MockConfig {
        fault_rates: vec![
            (Fault::RateLimited { retry_after: Some("0".into()) }, 0.1),
            (Fault::Status(503), 0.1),
            (Fault::ConnectionReset, 0.05),
            (Fault::TruncatedBody, 0.05),
        ],
        seed: 11,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("label_train.jsonl");
    let mut target = gemini_target(&mock, "g");
    target.stream = true;
    target.max_retries = 6;
    let router = router(vec![target], fast_policy());
    let run =
        run_label(prompts(40), router.clone(), &journal, None, LabelSettings::new("r", "s", 8), CancelToken::new())
            .await;
    assert_eq!(run.report.outcome, LabelOutcome::Completed, "{:?}", run.report.failures);
    assert_eq!(run.report.progress.done, 40);
    let counts = mock.counts();
    assert_eq!(counts.ok, 40, "each prompt answered once: {counts:?}");
    assert_eq!(counts.total, 40 + run.report.progress.failed_attempts as u64, "{counts:?}");
    assert!(run.report.progress.failed_attempts > 0, "the faults fired: {counts:?}");
    let records = LabelJournal::read(&journal).unwrap();
    assert_eq!(records.len(), 40);
    for record in records.values() {
        assert_eq!(record.provider.as_deref(), Some("gemini"));
        assert_eq!(record.model, "g-model");
        assert!(record.response.text.starts_with("label-"), "{record:?}");
    }
    let again =
        run_label(prompts(40), router, &journal, None, LabelSettings::new("r", "s", 8), CancelToken::new()).await;
    assert_eq!(again.report.progress.resumed, 40);
    assert_eq!(mock.counts().total, counts.total, "a re-run sends nothing");
}
