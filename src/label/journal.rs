//! Append-only JSONL journal of completed teacher calls, one file per labeling stage.
//!
//! A label counts as done only once [`LabelJournal::append`] has returned, i.e. its line is
//! written and (with [`Durability::Fsync`]) `fdatasync`ed. On open, the file is read back
//! and a torn last line — a crash mid-write — is truncated away; any other bad line is
//! corruption and an error, never silently skipped.
//!
//! Fsync policy: group commit. One writer thread takes every record queued while the
//! previous sync was running, writes them with one `write` and syncs once, then
//! acknowledges them all. Each record is durable before it counts, yet the number of
//! fsyncs per second is bounded by the disk, not by the request rate (figures in STATUS.md).
//! Records contain responses and identifiers only; never requests' secrets or API keys.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::providers::{ChatResponse, RequestId};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open journal {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("journal {path} is corrupt at line {line}: {reason}")]
    Corrupt { path: PathBuf, line: usize, reason: String },
    #[error("journal write failed: {0}")]
    Write(String),
    #[error("journal writer has stopped")]
    Closed,
}

/// One completed teacher call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// Content hash of the request ([`crate::providers::ChatRequest::content_id`]).
    pub id: RequestId,
    /// The target that answered (its display name).
    pub target: String,
    /// Its wire protocol (`openai_compatible`, …); with `model`, which teacher this answer
    /// is from. Absent in journals written before tangle recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub model: String,
    pub response: ChatResponse,
    pub cost_usd: f64,
    pub latency_ms: u64,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Group-committed `fdatasync`: survives power loss. The default.
    Fsync,
    /// Written to the OS only: survives a process crash (SIGKILL), not a power loss.
    OsBuffered,
}

/// What [`LabelJournal::open`] found on disk.
#[derive(Debug, Default)]
pub struct JournalContents {
    pub records: HashMap<RequestId, JournalRecord>,
    /// Bytes of a torn last line that were cut off (0 for a clean file).
    pub truncated_bytes: u64,
}

struct WriteJob {
    line: Vec<u8>,
    ack: oneshot::Sender<Result<(), String>>,
}

pub struct LabelJournal {
    path: PathBuf,
    sender: Option<mpsc::Sender<WriteJob>>,
    writer: Option<JoinHandle<()>>,
}

/// Reads a journal, returning its records in file order and the byte offset where valid
/// data ends.
fn parse_journal(path: &Path, bytes: &[u8]) -> Result<(Vec<JournalRecord>, usize), JournalError> {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut line_number = 0;
    while offset < bytes.len() {
        line_number += 1;
        let Some(len) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            break; // no newline: torn tail
        };
        let line = &bytes[offset..offset + len];
        match serde_json::from_slice::<JournalRecord>(line) {
            Ok(record) => {
                records.push(record);
                offset += len + 1;
            }
            Err(e) => {
                let is_last_line = offset + len + 1 >= bytes.len();
                if is_last_line {
                    break; // a torn write that happened to end in a newline
                }
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: line_number,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok((records, offset))
}

/// The first record of each request id: what a journal holds for one teacher.
fn first_per_id(records: Vec<JournalRecord>) -> HashMap<RequestId, JournalRecord> {
    let mut by_id = HashMap::new();
    for record in records {
        by_id.entry(record.id.clone()).or_insert(record);
    }
    by_id
}

/// Takes the journal's advisory lock, so two processes never append to (or repair the tail
/// of) one journal at once; the kernel drops it when the file closes, a crash included.
/// `Ok(false)` means another process holds it and this call waited for it.
#[cfg(unix)]
fn lock_exclusive(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let busy = std::io::Error::last_os_error();
    if busy.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(busy);
    }
    // SAFETY: as above.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
        Ok(false)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn lock_exclusive(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

impl LabelJournal {
    /// Opens (creating if needed) the journal, repairs a torn tail, and starts the writer.
    pub fn open(path: &Path, durability: Durability) -> Result<(Self, JournalContents), JournalError> {
        let open_err = |source| JournalError::Open { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(open_err)?;
        if !lock_exclusive(&file).map_err(open_err)? {
            tracing::warn!(path = %path.display(), "waited for another tangle process labeling with this journal");
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(open_err)?;
        let (records, valid_len) = parse_journal(path, &bytes)?;
        let truncated_bytes = (bytes.len() - valid_len) as u64;
        if truncated_bytes > 0 {
            tracing::warn!(path = %path.display(), truncated_bytes, "journal had a torn last line; truncated");
            file.set_len(valid_len as u64).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        }
        let (sender, receiver) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("label-journal".into())
            .spawn(move || run_writer(file, receiver, durability))
            .map_err(open_err)?;
        Ok((
            Self { path: path.to_path_buf(), sender: Some(sender), writer: Some(writer) },
            JournalContents { records: first_per_id(records), truncated_bytes },
        ))
    }

    /// Reads a journal without repairing or locking it (for reports and tests): the first
    /// record of each request.
    pub fn read(path: &Path) -> Result<HashMap<RequestId, JournalRecord>, JournalError> {
        Ok(first_per_id(Self::read_all(path)?))
    }

    /// Every record of a journal, in the order written, without repairing or locking it. One
    /// request may have several (answers of different teachers sharing the journal).
    pub fn read_all(path: &Path) -> Result<Vec<JournalRecord>, JournalError> {
        let bytes = std::fs::read(path).map_err(|source| JournalError::Open { path: path.to_path_buf(), source })?;
        Ok(parse_journal(path, &bytes)?.0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record; returns once it is written (and synced, per [`Durability`]).
    pub async fn append(&self, record: &JournalRecord) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(record).map_err(|e| JournalError::Write(e.to_string()))?;
        line.push(b'\n');
        let (ack, done) = oneshot::channel();
        self.sender
            .as_ref()
            .ok_or(JournalError::Closed)?
            .send(WriteJob { line, ack })
            .map_err(|_| JournalError::Closed)?;
        done.await.map_err(|_| JournalError::Closed)?.map_err(JournalError::Write)
    }

    /// Stops the writer after it has written everything queued.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            // The writer only exits on channel close; a panic there is already reported.
            let _ = writer.join();
        }
    }
}

impl Drop for LabelJournal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Upper bound on records per group commit, so acknowledgements keep flowing under load.
const MAX_BATCH: usize = 4096;

fn run_writer(mut file: File, receiver: mpsc::Receiver<WriteJob>, durability: Durability) {
    let mut failed: Option<String> = None;
    let mut buffer = Vec::new();
    let mut acks = Vec::new();
    while let Ok(first) = receiver.recv() {
        buffer.clear();
        buffer.extend_from_slice(&first.line);
        acks.push(first.ack);
        while acks.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => {
                    buffer.extend_from_slice(&job.line);
                    acks.push(job.ack);
                }
                Err(_) => break,
            }
        }
        // After one failed write the file may hold a partial line; refuse everything after
        // it rather than appending behind garbage. Reopening repairs the tail.
        let result = match &failed {
            Some(e) => Err(e.clone()),
            None => {
                let written = file.write_all(&buffer).and_then(|()| match durability {
                    Durability::Fsync => file.sync_data(),
                    Durability::OsBuffered => Ok(()),
                });
                written.map_err(|e| {
                    let message = e.to_string();
                    failed = Some(message.clone());
                    message
                })
            }
        };
        for ack in acks.drain(..) {
            // The caller may have been cancelled; its record is written regardless.
            let _ = ack.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Usage;

    fn record(id: &str) -> JournalRecord {
        JournalRecord {
            id: id.into(),
            target: "t".into(),
            provider: None,
            model: "m".into(),
            response: ChatResponse {
                text: format!("label {id}"),
                finish_reason: Some("stop".into()),
                usage: Usage { input_tokens: 3, output_tokens: 2 },
                model: None,
                logprobs: None,
            },
            cost_usd: 0.0,
            latency_ms: 1,
            timestamp_ms: 0,
        }
    }

    #[tokio::test]
    async fn append_then_reopen_and_truncate_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage/journal.jsonl");
        let (journal, contents) = LabelJournal::open(&path, Durability::Fsync).unwrap();
        assert!(contents.records.is_empty());
        journal.append(&record("a")).await.unwrap();
        journal.append(&record("b")).await.unwrap();
        journal.close();
        let good_len = std::fs::metadata(&path).unwrap().len();
        // Simulate a crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"c\",\"tar").unwrap();
        drop(f);
        let (journal, contents) = LabelJournal::open(&path, Durability::Fsync).unwrap();
        assert_eq!(contents.records.len(), 2);
        assert_eq!(contents.truncated_bytes, 14);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        journal.append(&record("c")).await.unwrap();
        drop(journal);
        let records = LabelJournal::read(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records["c"].response.text, "label c");
    }

    #[tokio::test]
    async fn corruption_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let good = serde_json::to_string(&record("a")).unwrap();
        std::fs::write(&path, format!("{good}\nGARBAGE\n{good}\n")).unwrap();
        let err = LabelJournal::open(&path, Durability::Fsync).err().unwrap();
        assert!(matches!(err, JournalError::Corrupt { line: 2, .. }), "{err}");
        // A complete but unparsable *last* line is a torn write and is cut.
        std::fs::write(&path, format!("{good}\n{{\"id\":\n")).unwrap();
        let (_j, contents) = LabelJournal::open(&path, Durability::Fsync).unwrap();
        assert_eq!(contents.records.len(), 1);
        assert_eq!(contents.truncated_bytes, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_all_durable_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (journal, _) = LabelJournal::open(&path, Durability::Fsync).unwrap();
        let journal = std::sync::Arc::new(journal);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let j = journal.clone();
            tasks.push(tokio::spawn(async move { j.append(&record(&i.to_string())).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(LabelJournal::read(&path).unwrap().len(), 200);
    }
}
