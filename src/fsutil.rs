//! Durable file operations: atomic writes, content hashes, cheap copies.

use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one:
/// a temp file in the same directory, fsynced, then renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(())
}

/// Gives `path` the mode a plain `File::create` would (0666 less the process umask, 0644
/// under the usual umask). Writers that go through a private temp file (safetensors' own
/// `serialize_to_file` does) leave 0600, which a server running as another user cannot
/// read; an artifact is meant to be shared.
pub fn set_usual_permissions(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o666 & !process_umask()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The process's umask, read from `/proc` (reading it through `umask(2)` would have to set
/// it, racing other threads); 0o022 where `/proc` does not say.
#[cfg(unix)]
pub fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o022)
}

/// Makes a rename or creation inside `dir` durable. Best effort: some filesystems refuse
/// to fsync a directory, and nothing is lost but the durability guarantee.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// sha256 of a file's contents, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every regular file under `root`, as paths relative to it, sorted.
pub fn list_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_path_buf());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Mirrors the files of `from` into `to` with hard links where the filesystem allows,
/// copies otherwise. `to` must not exist yet. Returns how many files were copied.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<usize> {
    let mut copied = 0;
    for rel in list_files(from)? {
        let target = to.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::hard_link(from.join(&rel), &target).is_err() {
            fs::copy(from.join(&rel), &target)?;
            fs::File::open(&target)?.sync_all()?;
            copied += 1;
        }
    }
    fs::create_dir_all(to)?;
    Ok(copied)
}

/// Whether a process with this id is alive (signal 0 probes without signalling).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only reports whether the pid exists.
    unsafe { libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}
