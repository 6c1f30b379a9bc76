//! The model registry: versions of a pipeline's packaged student, and aliases (`production`)
//! that point at one of them.
//!
//! Layout, under the registry directory:
//!
//! ```text
//! <pipeline>/versions/<version>/          the package: artifact/, report.json, manifest.json
//! <pipeline>/aliases/<alias>              one line: the version it points at
//! ```
//!
//! An alias file is replaced atomically (write + rename), so a reader sees the old or the new
//! version, never a torn one.

use crate::report::EvalReport;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// A version an alias resolves to.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: String,
    pub dir: PathBuf,
}

impl Registry {
    pub fn open(root: &Path) -> Registry {
        Registry { root: root.to_path_buf() }
    }

    fn alias_file(&self, pipeline: &str, alias: &str) -> PathBuf {
        self.root.join(pipeline).join("aliases").join(alias)
    }

    /// The version `alias` points at, if it exists and its directory is present.
    pub fn resolve(&self, pipeline: &str, alias: &str) -> std::io::Result<Option<Deployed>> {
        let version = match std::fs::read_to_string(self.alias_file(pipeline, alias)) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let dir = self.root.join(pipeline).join("versions").join(&version);
        if version.is_empty() || !dir.is_dir() {
            return Err(std::io::Error::other(format!(
                "alias `{alias}` of `{pipeline}` points at version `{version}`, which is not in the registry"
            )));
        }
        Ok(Some(Deployed { version, dir }))
    }

    /// The eval report stored with a deployed version.
    pub fn report(&self, deployed: &Deployed) -> std::io::Result<EvalReport> {
        let bytes = std::fs::read(deployed.dir.join("report.json"))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}
