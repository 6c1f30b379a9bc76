//! The model registry: versions of a pipeline's packaged student, and aliases (`production`)
//! that point at one of them.
//!
//! Layout, under the registry directory:
//!
//! ```text
//! <pipeline>/versions/<version>/          a package: artifact/ (with manifest.json), report.json
//! <pipeline>/aliases/<alias>              one line: the version it points at
//! <pipeline>/aliases/<alias>.history      one line per move: time, set|rollback, version
//! <pipeline>/.lock                        serialises alias moves between processes
//! ```
//!
//! A version's name is derived from its manifest's hash, so registering the same package
//! twice is a no-op. Versions are copied into a staging directory, verified against their
//! manifest, and renamed into place; an alias file is replaced atomically under the lock, so
//! concurrent promotes never leave a torn or dangling alias.

use crate::artifact::{self, Manifest};
use crate::fsutil;
use crate::report::EvalReport;
use serde::Serialize;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// A version an alias resolves to.
#[derive(Debug, Clone, Serialize)]
pub struct Deployed {
    pub version: String,
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("`{pipeline}` has no version `{version}` in the registry")]
    NoVersion { pipeline: String, version: String },
    #[error("alias `{alias}` of `{pipeline}` has no earlier version to roll back to")]
    NoHistory { pipeline: String, alias: String },
    #[error("the package is damaged: {0}")]
    Damaged(String),
}

/// One line of an alias's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AliasMove {
    pub at: String,
    /// `set` (a promote) or `rollback`.
    pub op: String,
    pub version: String,
}

impl Registry {
    pub fn open(root: &Path) -> Registry {
        Registry { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pipeline_dir(&self, pipeline: &str) -> PathBuf {
        self.root.join(pipeline)
    }

    fn alias_file(&self, pipeline: &str, alias: &str) -> PathBuf {
        self.pipeline_dir(pipeline).join("aliases").join(alias)
    }

    pub fn version_dir(&self, pipeline: &str, version: &str) -> PathBuf {
        self.pipeline_dir(pipeline).join("versions").join(version)
    }

    /// The version `alias` points at, if the alias exists.
    pub fn resolve(&self, pipeline: &str, alias: &str) -> io::Result<Option<Deployed>> {
        let version = match fs::read_to_string(self.alias_file(pipeline, alias)) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let dir = self.version_dir(pipeline, &version);
        if version.is_empty() || !dir.is_dir() {
            return Err(io::Error::other(format!(
                "alias `{alias}` of `{pipeline}` points at version `{version}`, which is not in the registry"
            )));
        }
        Ok(Some(Deployed { version, dir }))
    }

    /// `NAME`, `NAME@ALIAS` or `NAME@VERSION` → the version directory.
    pub fn lookup(&self, reference: &str, default_alias: &str) -> Result<Deployed, RegistryError> {
        let (pipeline, which) = reference.split_once('@').unwrap_or((reference, default_alias));
        if let Some(d) = self.resolve(pipeline, which)? {
            return Ok(d);
        }
        let dir = self.version_dir(pipeline, which);
        if dir.is_dir() {
            return Ok(Deployed { version: which.to_string(), dir });
        }
        Err(RegistryError::NoVersion { pipeline: pipeline.into(), version: which.into() })
    }

    /// The eval report stored with a version.
    pub fn report(&self, deployed: &Deployed) -> io::Result<EvalReport> {
        let bytes = fs::read(deployed.dir.join("report.json"))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// Brings a package (a directory with `artifact/manifest.json`) in as a version, verified.
    /// Returns the version name; an identical package already registered is reused.
    pub fn register(&self, pipeline: &str, package: &Path) -> Result<String, RegistryError> {
        let manifest = artifact::verify(&package.join("artifact")).map_err(RegistryError::Damaged)?;
        let version = version_name(&manifest);
        let target = self.version_dir(pipeline, &version);
        if target.is_dir() {
            artifact::verify(&target.join("artifact")).map_err(RegistryError::Damaged)?;
            return Ok(version);
        }
        let staging = self.pipeline_dir(pipeline).join(format!(".incoming-{}-{version}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        // Hard links share the verified bytes (no store writes a file in place, and every
        // load re-verifies); a copy, across filesystems, is verified again.
        if fsutil::link_tree(package, &staging)? > 0 {
            artifact::verify(&staging.join("artifact")).map_err(RegistryError::Damaged)?;
        }
        fs::create_dir_all(target.parent().unwrap_or(&self.root))?;
        match fs::rename(&staging, &target) {
            Ok(()) => {}
            // Registered concurrently by another process: the same content by construction.
            Err(_) if target.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(version)
    }

    /// Points `alias` at `version` and records the move; returns the previous version.
    pub fn set_alias(&self, pipeline: &str, alias: &str, version: &str) -> Result<Option<String>, RegistryError> {
        if !self.version_dir(pipeline, version).is_dir() {
            return Err(RegistryError::NoVersion { pipeline: pipeline.into(), version: version.into() });
        }
        let _lock = self.lock(pipeline)?;
        let previous = self.resolve(pipeline, alias).ok().flatten().map(|d| d.version);
        if previous.as_deref() != Some(version) {
            self.append_history(pipeline, alias, "set", version)?;
            fsutil::write_atomic(&self.alias_file(pipeline, alias), format!("{version}\n").as_bytes())?;
        }
        Ok(previous)
    }

    /// Moves `alias` back to the version it pointed at before its current one. Moves form a
    /// stack: rolling back twice goes back two promotions.
    pub fn rollback(&self, pipeline: &str, alias: &str) -> Result<String, RegistryError> {
        let _lock = self.lock(pipeline)?;
        let mut stack: Vec<String> = Vec::new();
        for m in self.history(pipeline, alias)? {
            match m.op.as_str() {
                "rollback" => {
                    stack.pop();
                }
                _ => stack.push(m.version),
            }
        }
        stack.pop();
        let previous = stack
            .last()
            .filter(|v| self.version_dir(pipeline, v).is_dir())
            .cloned()
            .ok_or_else(|| RegistryError::NoHistory { pipeline: pipeline.into(), alias: alias.into() })?;
        self.append_history(pipeline, alias, "rollback", &previous)?;
        fsutil::write_atomic(&self.alias_file(pipeline, alias), format!("{previous}\n").as_bytes())?;
        Ok(previous)
    }

    pub fn history(&self, pipeline: &str, alias: &str) -> io::Result<Vec<AliasMove>> {
        let path = self.pipeline_dir(pipeline).join("aliases").join(format!("{alias}.history"));
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let (at, op, version) = (parts.next()?, parts.next()?, parts.next()?);
                Some(AliasMove { at: at.into(), op: op.into(), version: version.into() })
            })
            .collect())
    }

    fn append_history(&self, pipeline: &str, alias: &str, op: &str, version: &str) -> io::Result<()> {
        let dir = self.pipeline_dir(pipeline).join("aliases");
        fs::create_dir_all(&dir)?;
        let mut f = fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{alias}.history")))?;
        f.write_all(format!("{} {op} {version}\n", crate::timefmt::now_rfc3339()).as_bytes())?;
        f.sync_all()
    }

    /// Pipelines, each with its versions and aliases.
    pub fn list(&self) -> io::Result<Vec<PipelineListing>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else { return Ok(out) };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let mut versions: Vec<(String, std::time::SystemTime)> =
                fs::read_dir(self.pipeline_dir(&name).join("versions"))
                    .map(|d| {
                        d.flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| {
                                let t = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                                (e.file_name().to_string_lossy().into_owned(), t)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            versions.sort_by_key(|(_, t)| *t);
            let mut aliases: Vec<(String, String)> = fs::read_dir(self.pipeline_dir(&name).join("aliases"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| !n.ends_with(".history") && !n.starts_with('.'))
                        .filter_map(|alias| {
                            let v = self.resolve(&name, &alias).ok().flatten()?.version;
                            Some((alias, v))
                        })
                        .collect()
                })
                .unwrap_or_default();
            aliases.sort();
            out.push(PipelineListing {
                pipeline: name,
                versions: versions.into_iter().map(|(v, _)| v).collect(),
                aliases,
            });
        }
        Ok(out)
    }

    /// An exclusive lock on the pipeline's aliases, released on drop.
    fn lock(&self, pipeline: &str) -> io::Result<LockFile> {
        fs::create_dir_all(self.pipeline_dir(pipeline))?;
        LockFile::acquire(&self.pipeline_dir(pipeline).join(".lock"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineListing {
    pub pipeline: String,
    /// Oldest first.
    pub versions: Vec<String>,
    /// (alias, version)
    pub aliases: Vec<(String, String)>,
}

/// `v-` and the first 12 hex digits of the manifest's files hash: the same package always
/// gets the same name.
pub fn version_name(manifest: &Manifest) -> String {
    let material = serde_json::to_string(&manifest.files).unwrap_or_default();
    format!("v-{}", &fsutil::sha256_bytes(material.as_bytes())[..12])
}

struct LockFile(fs::File);

impl LockFile {
    fn acquire(path: &Path) -> io::Result<LockFile> {
        use std::os::fd::AsRawFd;
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock on a descriptor we own; it is released when the file is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LockFile(file))
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking our own descriptor.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}
