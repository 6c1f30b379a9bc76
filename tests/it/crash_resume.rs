//! SIGKILL the labeling harness at 20 random points, resume each time, and check that
//! (1) the final labels equal an uninterrupted run's, (2) no resumed run ever re-sends a
//! request that was already journaled, and (3) the only extra calls are those in flight at
//! each kill (reported; bounded by 2 x concurrency: at the provider, or answered and
//! awaiting their journal fsync).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tangle::label::LabelJournal;
use tangle::mock::{MockConfig, MockServer};
use tangle::providers::config::GenerationParams;
use tangle::providers::{ChatMessage, ChatRequest, RequestId};

const N: usize = 1000;
const CONCURRENCY: usize = 16;
const KILLS: usize = 20;

/// Same requests as `src/bin/label_harness.rs`.
fn harness_request(i: usize) -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::system("Label the prompt."), ChatMessage::user(format!("prompt {i}"))],
        GenerationParams { temperature: Some(0.0), max_tokens: Some(16), ..Default::default() },
    )
}

fn harness(mock: &MockServer, dir: &Path, out: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_label_harness"));
    cmd.args(["--base-url", &mock.openai_base_url()])
        .arg("--journal")
        .arg(dir.join("journal.jsonl"))
        .arg("--ledger")
        .arg(dir.join("ledger.db"))
        .args(["--n", &N.to_string(), "--concurrency", &CONCURRENCY.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    cmd
}

fn journal_ids(dir: &Path) -> HashSet<RequestId> {
    match LabelJournal::read(&dir.join("journal.jsonl")) {
        Ok(records) => records.into_keys().collect(),
        Err(_) => HashSet::new(), // not created yet
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_then_resume() {
    // Mock prompt log line -> request id, to map what the server saw back to requests.
    let id_of_prompt: HashMap<String, RequestId> = (0..N)
        .map(|i| (format!("system: Label the prompt.\nuser: prompt {i}\n"), harness_request(i).content_id()))
        .collect();
    let latency = Duration::from_millis(15);

    // Reference: one uninterrupted run.
    let reference_mock = MockServer::start(MockConfig { base_latency: latency, ..Default::default() }).await.unwrap();
    let ref_dir = tempfile::tempdir().unwrap();
    let ref_out = ref_dir.path().join("labels.json");
    let status = harness(&reference_mock, ref_dir.path(), Some(&ref_out)).status().unwrap();
    assert!(status.success());
    let reference: Vec<Option<String>> = serde_json::from_slice(&std::fs::read(&ref_out).unwrap()).unwrap();
    assert_eq!(reference.len(), N);
    assert!(reference.iter().all(Option::is_some));
    assert_eq!(reference_mock.counts().total as usize, N);

    // Crash series. An uninterrupted run takes ~N/CONCURRENCY * latency ≈ 1 s; each life
    // lasts 0-60 ms after its first call, so the kills land before the end.
    let mock = MockServer::start(MockConfig { base_latency: latency, ..Default::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::rng().random();
    println!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut wasted_total = 0usize;
    let mut killed_mid_run = 0;
    for kill in 0..KILLS {
        let journaled_before = journal_ids(dir.path());
        let received_before = mock.received_prompts().len();
        let total_before = mock.counts().total;
        let mut child = harness(&mock, dir.path(), None).spawn().unwrap();
        // Kill at a random point after the labeler has started calling (process start-up
        // time varies with machine load; a kill before any call would test nothing).
        let waiting_since = std::time::Instant::now();
        while mock.counts().total == total_before
            && child.try_wait().unwrap().is_none()
            && waiting_since.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let delay = Duration::from_millis(rng.random_range(0..60));
        tokio::time::sleep(delay).await;
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        // Let the mock finish answering the calls the dead process left behind.
        tokio::time::sleep(latency * 3).await;

        let journaled_after = journal_ids(dir.path());
        let sent: Vec<String> = mock.received_prompts()[received_before..].to_vec();
        for prompt in &sent {
            let id = &id_of_prompt[prompt];
            assert!(!journaled_before.contains(id), "kill {kill}: resumed run re-sent a journaled request");
        }
        let newly_journaled = journaled_after.len() - journaled_before.len();
        let wasted = sent.len() - newly_journaled;
        // In flight = at the provider (<= CONCURRENCY) or answered and awaiting the
        // journal commit (<= CONCURRENCY), see label::label.
        assert!(wasted <= 2 * CONCURRENCY, "kill {kill}: {wasted} calls lost, more than can be in flight");
        wasted_total += wasted;
        if !finished && !sent.is_empty() && journaled_after.len() < N {
            killed_mid_run += 1;
        }
        println!(
            "kill {kill:2} {delay:?} after first call: sent {:3}, journaled {:3} (total {:3}), lost in flight {wasted}",
            sent.len(),
            newly_journaled,
            journaled_after.len()
        );
    }
    assert!(killed_mid_run >= KILLS / 2, "only {killed_mid_run} kills hit a running labeler");

    // Final resume to completion.
    let out = dir.path().join("labels.json");
    let received_before = mock.received_prompts().len();
    let journaled_before = journal_ids(dir.path());
    let status = harness(&mock, dir.path(), Some(&out)).status().unwrap();
    assert!(status.success());
    let final_sent = mock.received_prompts().len() - received_before;
    assert_eq!(final_sent, N - journaled_before.len(), "final run sends exactly the missing ones");
    let labels: Vec<Option<String>> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(labels, reference, "labels after 20 crashes equal the uninterrupted run's");
    let total_calls = mock.counts().total as usize;
    assert_eq!(total_calls, N + wasted_total);
    println!(
        "crash test: {KILLS} kills ({killed_mid_run} mid-run), {total_calls} calls for {N} prompts, \
         {wasted_total} lost in flight at kills (bound 2 x {CONCURRENCY} per kill)"
    );
}
