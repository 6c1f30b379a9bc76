//! Helpers shared by the integration tests that run the real `tangle` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The value tests give `TANGLE_TEST_OPENAI_KEY`; no output may ever contain it.
pub const TEST_SECRET: &str = "sk-test-secret-3f9a1c";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tangle` run from the repository root, with the test secret in its environment.
pub fn tangle() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tangle"));
    cmd.current_dir(repo())
        .env("TANGLE_TEST_OPENAI_KEY", TEST_SECRET)
        .env_remove("TANGLE_TEST_UNSET_KEY")
        .env("CI", "true");
    cmd
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn assert_no_secret(output: &Output) {
    for stream in [&output.stdout, &output.stderr] {
        assert!(!text(stream).contains(TEST_SECRET), "the secret leaked:\n{}", text(stream));
    }
}

/// Spec files under a directory of the repository, sorted, as repo-relative paths.
pub fn specs_in(dir: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| p.strip_prefix(repo()).unwrap().to_path_buf())
        .collect();
    out.sort();
    out
}

pub fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}
