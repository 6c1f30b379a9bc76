//! The content-addressed stage cache.
//!
//! An entry is a directory `cache/<kind>/<key>/` holding the stage's output files under
//! `files/` and `entry.json`, which lists every file with its sha256 and the stage's outcome.
//! Entries are staged in `tmp/` and renamed into place, so a crash never leaves a half
//! entry under its key; every lookup re-hashes the files, so a damaged entry is detected,
//! discarded and recomputed instead of trusted.

use crate::fsutil;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const ENTRY_FILE: &str = "entry.json";
/// Size, modification time and inode of each file when its hash last matched: a lookup whose
/// files all still show these skips re-hashing (a multi-GB model would otherwise cost
/// seconds on every hit). Any write to a file changes its modification time.
const STAMP_FILE: &str = "verified.json";

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// What `entry.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryManifest {
    pub kind: String,
    pub key: String,
    pub created_at: String,
    /// Relative path → sha256 of every output file.
    pub files: BTreeMap<String, String>,
    /// The stage's summary and verdict, replayed on a cache hit.
    pub outcome: Value,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: EntryManifest,
}

impl Entry {
    /// The directory holding the output files.
    pub fn files(&self) -> PathBuf {
        self.dir.join("files")
    }
}

#[derive(Debug)]
pub enum Lookup {
    Hit(Entry),
    Miss,
    /// The entry existed but failed verification; it has been removed.
    Corrupted {
        reason: String,
    },
}

/// A directory to write outputs into before they are committed under a key.
#[derive(Debug)]
pub struct Staging {
    pub dir: PathBuf,
}

impl Staging {
    pub fn files(&self) -> PathBuf {
        self.dir.join("files")
    }
}

impl Cache {
    pub fn new(state_dir: &Path) -> Cache {
        Cache { root: state_dir.to_path_buf() }
    }

    fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("cache").join(kind).join(key)
    }

    pub fn lookup(&self, kind: &str, key: &str) -> io::Result<Lookup> {
        let dir = self.entry_dir(kind, key);
        if !dir.exists() {
            return Ok(Lookup::Miss);
        }
        match verify(&dir, kind, key) {
            Ok(manifest) => Ok(Lookup::Hit(Entry { dir, manifest })),
            Err(reason) => {
                self.discard(&dir)?;
                Ok(Lookup::Corrupted { reason })
            }
        }
    }

    /// Moves a bad entry aside (atomic) and deletes it.
    fn discard(&self, dir: &Path) -> io::Result<()> {
        let trash = self.root.join("tmp").join(format!(
            "discarded-{}-{}",
            std::process::id(),
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry")
        ));
        fs::create_dir_all(self.root.join("tmp"))?;
        let _ = fs::remove_dir_all(&trash);
        fs::rename(dir, &trash)?;
        fs::remove_dir_all(&trash)
    }

    /// A fresh staging directory. Names carry the pid, so stale ones from a killed process
    /// can be told apart from a concurrent run's (see [`Cache::sweep_stale`]).
    pub fn stage(&self, kind: &str, key: &str) -> io::Result<Staging> {
        let nonce: u32 = rand_nonce();
        let dir = self.root.join("tmp").join(format!(
            "{}-{kind}-{}-{nonce:08x}",
            std::process::id(),
            &key[..16.min(key.len())]
        ));
        fs::create_dir_all(dir.join("files"))?;
        Ok(Staging { dir })
    }

    /// Hashes the staged files, writes the manifest and renames the entry into place.
    pub fn commit(&self, staging: Staging, kind: &str, key: &str, outcome: Value) -> io::Result<Entry> {
        let files_dir = staging.files();
        let mut files = BTreeMap::new();
        for rel in fsutil::list_files(&files_dir)? {
            let hash = fsutil::sha256_file(&files_dir.join(&rel))?;
            files.insert(rel.to_string_lossy().replace('\\', "/"), hash);
            // Durability of the contents before the rename that publishes them.
            fs::File::open(files_dir.join(&rel))?.sync_all()?;
        }
        let manifest = EntryManifest {
            kind: kind.to_string(),
            key: key.to_string(),
            created_at: crate::timefmt::now_rfc3339(),
            files,
            outcome,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        fsutil::write_atomic(&staging.dir.join(ENTRY_FILE), &json)?;
        let dir = self.entry_dir(kind, key);
        fs::create_dir_all(dir.parent().unwrap_or(&self.root))?;
        match fs::rename(&staging.dir, &dir) {
            Ok(()) => {}
            // Another process committed the same key first; its entry is as good as ours.
            Err(_) if dir.join(ENTRY_FILE).exists() => {
                let _ = fs::remove_dir_all(&staging.dir);
            }
            Err(e) => return Err(e),
        }
        if let Some(parent) = dir.parent() {
            fsutil::sync_dir(parent);
        }
        write_stamp(&dir, &manifest);
        Ok(Entry { dir, manifest })
    }

    /// Removes staging directories left by processes that no longer exist.
    pub fn sweep_stale(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let stale = match pid {
                Some(pid) => !fsutil::process_alive(pid),
                None => name.starts_with("discarded-"),
            };
            if stale {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Checks an entry against its manifest: every listed file present with its hash, nothing
/// extra. Returns why it is unusable otherwise.
fn verify(dir: &Path, kind: &str, key: &str) -> Result<EntryManifest, String> {
    let raw = fs::read(dir.join(ENTRY_FILE)).map_err(|e| format!("entry.json unreadable: {e}"))?;
    let manifest: EntryManifest = serde_json::from_slice(&raw).map_err(|e| format!("entry.json is not valid: {e}"))?;
    if manifest.key != key || manifest.kind != kind {
        return Err("entry.json belongs to another key".into());
    }
    let files_dir = dir.join("files");
    let present = fsutil::list_files(&files_dir).map_err(|e| format!("files unreadable: {e}"))?;
    let present: Vec<String> = present.iter().map(|p| p.to_string_lossy().replace('\\', "/")).collect();
    for rel in &present {
        if !manifest.files.contains_key(rel) {
            return Err(format!("unexpected file `{rel}`"));
        }
    }
    if stamp_matches(dir, &manifest) {
        return Ok(manifest);
    }
    for (rel, expected) in &manifest.files {
        let actual = fsutil::sha256_file(&files_dir.join(rel)).map_err(|e| format!("`{rel}` unreadable: {e}"))?;
        if &actual != expected {
            return Err(format!("`{rel}` does not match its recorded sha256"));
        }
    }
    write_stamp(dir, &manifest);
    Ok(manifest)
}

fn file_stamps(dir: &Path, manifest: &EntryManifest) -> Option<BTreeMap<String, (u64, i64, i64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let files_dir = dir.join("files");
    manifest
        .files
        .keys()
        .map(|rel| {
            let m = fs::metadata(files_dir.join(rel)).ok()?;
            Some((rel.clone(), (m.len(), m.mtime(), m.mtime_nsec(), m.ino())))
        })
        .collect()
}

fn write_stamp(dir: &Path, manifest: &EntryManifest) {
    if let Some(stamps) = file_stamps(dir, manifest) {
        if let Ok(json) = serde_json::to_vec(&stamps) {
            let _ = fsutil::write_atomic(&dir.join(STAMP_FILE), &json);
        }
    }
}

fn stamp_matches(dir: &Path, manifest: &EntryManifest) -> bool {
    let Ok(raw) = fs::read(dir.join(STAMP_FILE)) else { return false };
    let Ok(recorded) = serde_json::from_slice::<BTreeMap<String, (u64, i64, i64, u64)>>(&raw) else { return false };
    file_stamps(dir, manifest).is_some_and(|now| now == recorded)
}

fn rand_nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn commit(cache: &Cache, key: &str, text: &str) -> Entry {
        let staging = cache.stage("demo", key).expect("stage");
        fs::write(staging.files().join("out.txt"), text).expect("write");
        cache.commit(staging, "demo", key, json!({"n": 1})).expect("commit")
    }

    #[test]
    fn committed_entries_are_hits() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = Cache::new(tmp.path());
        let key = "a".repeat(64);
        assert!(matches!(cache.lookup("demo", &key).expect("lookup"), Lookup::Miss));
        commit(&cache, &key, "hello");
        match cache.lookup("demo", &key).expect("lookup") {
            Lookup::Hit(entry) => {
                assert_eq!(entry.manifest.outcome, json!({"n": 1}));
                assert_eq!(fs::read_to_string(entry.files().join("out.txt")).expect("read"), "hello");
            }
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    #[test]
    fn tampered_missing_or_extra_files_are_corruption() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = Cache::new(tmp.path());
        for (i, damage) in ["edit", "remove", "add", "manifest"].iter().enumerate() {
            let key = format!("{i}").repeat(64);
            let entry = commit(&cache, &key, "hello");
            match *damage {
                "edit" => fs::write(entry.files().join("out.txt"), "hellO").expect("edit"),
                "remove" => fs::remove_file(entry.files().join("out.txt")).expect("rm"),
                "add" => fs::write(entry.files().join("extra.txt"), "x").expect("add"),
                _ => fs::write(entry.dir.join(ENTRY_FILE), "{").expect("manifest"),
            }
            assert!(
                matches!(cache.lookup("demo", &key).expect("lookup"), Lookup::Corrupted { .. }),
                "{damage} went unnoticed"
            );
            assert!(matches!(cache.lookup("demo", &key).expect("lookup"), Lookup::Miss), "{damage}: not removed");
        }
    }
}
