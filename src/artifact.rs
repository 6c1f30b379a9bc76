//! The deployable artifact: a Hugging Face-style model directory plus `manifest.json`, which
//! records the sha256 of every file and the lineage of the model (spec, data, teacher,
//! tangle version, run). Anything that loads an artifact verifies it first.

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_SCHEMA: &str = "tangle.manifest/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema: String,
    /// Relative path → sha256, for every file of the artifact but the manifest itself.
    pub files: BTreeMap<String, String>,
    pub lineage: Lineage,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lineage {
    pub pipeline: String,
    pub run_id: String,
    pub tangle_version: String,
    pub created_at: String,
    pub spec_sha256: String,
    pub dataset_sha256: String,
    /// The model the student was fine-tuned from.
    pub base_model: String,
    /// `provider/model` of each teacher target, in failover order.
    pub teacher: Vec<String>,
}

/// Hashes every file under `dir` and writes `manifest.json` beside them.
pub fn write_manifest(dir: &Path, lineage: Lineage) -> std::io::Result<Manifest> {
    let mut files = BTreeMap::new();
    for rel in fsutil::list_files(dir)? {
        let name = rel.to_string_lossy().replace('\\', "/");
        if name == MANIFEST_FILE {
            continue;
        }
        files.insert(name, fsutil::sha256_file(&dir.join(&rel))?);
    }
    let manifest = Manifest { schema: MANIFEST_SCHEMA.into(), files, lineage };
    let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    fsutil::write_atomic(&dir.join(MANIFEST_FILE), &json)?;
    Ok(manifest)
}

/// Checks an artifact against its manifest: every file present with its recorded hash, and
/// nothing unlisted. The error says which file and how to recover.
pub fn verify(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a tangle manifest: {e}", path.display()))?;
    let present = fsutil::list_files(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for rel in &present {
        let name = rel.to_string_lossy().replace('\\', "/");
        if name != MANIFEST_FILE && !manifest.files.contains_key(&name) {
            return Err(format!("{} holds `{name}`, which its manifest does not list", dir.display()));
        }
    }
    for (name, expected) in &manifest.files {
        let file = dir.join(name);
        let actual = fsutil::sha256_file(&file)
            .map_err(|e| format!("`{name}` is missing or unreadable in {}: {e}", dir.display()))?;
        if &actual != expected {
            return Err(format!(
                "`{name}` in {} does not match the sha256 in its manifest (the file was modified or corrupted); re-package or re-fetch the artifact",
                dir.display()
            ));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lineage() -> Lineage {
        Lineage {
            pipeline: "p".into(),
            run_id: "r".into(),
            tangle_version: "0".into(),
            created_at: "t".into(),
            spec_sha256: "s".into(),
            dataset_sha256: "d".into(),
            base_model: "b".into(),
            teacher: vec!["openai/gpt".into()],
        }
    }

    #[test]
    fn a_written_manifest_verifies_and_tampering_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("config.json"), "{}").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/x.bin"), [1, 2, 3]).expect("write");
        let m = write_manifest(dir.path(), lineage()).expect("manifest");
        assert_eq!(m.files.len(), 2);
        assert_eq!(verify(dir.path()).expect("valid"), m);
        std::fs::write(dir.path().join("sub/x.bin"), [1, 2, 4]).expect("tamper");
        let e = verify(dir.path()).expect_err("tampered");
        assert!(e.contains("`sub/x.bin`") && e.contains("sha256"), "{e}");
        std::fs::write(dir.path().join("sub/x.bin"), [1, 2, 3]).expect("restore");
        std::fs::write(dir.path().join("extra.txt"), "x").expect("extra");
        assert!(verify(dir.path()).expect_err("extra").contains("extra.txt"));
    }
}
