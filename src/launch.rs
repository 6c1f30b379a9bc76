//! Local servers that a pipeline starts itself: teachers (`launch` on a teacher target) and
//! the student the eval stage measures as it is served.
//!
//! A teacher is started only when a labeling stage has something left to label, shared by
//! every stage of the run that needs the same `base_url`, and stopped when the run ends
//! ([`stop_all`]); the eval stage stops its student as soon as it is done ([`stop`]). It must never outlive tangle: the child gets its own process group (so
//! the terminal's Ctrl-C reaches tangle, which stops it in order), `PR_SET_PDEATHSIG`, and
//! `TANGLE_PARENT_PID`, which `tangle serve` watches — that covers `kill -9` of tangle even
//! when the command runs the server under a shell.

use crate::spec::LaunchSpec;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running server; dropping the last handle does not stop it, [`stop_all`] does.
#[derive(Debug)]
pub struct LaunchedServer {
    pub base_url: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl LaunchedServer {
    fn stop(&self) {
        let Ok(mut guard) = self.child.lock() else { return };
        let Some(mut child) = guard.take() else { return };
        let pgid = child.id() as libc::pid_t;
        // SIGTERM to the whole group (a shell and its server), then SIGKILL after a grace period.
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<LaunchedServer>>> {
    static SERVERS: OnceLock<Mutex<HashMap<String, Arc<LaunchedServer>>>> = OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

type SpawnReply = mpsc::Sender<std::io::Result<Child>>;

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so every child is forked
/// from one thread that lives as long as the process.
fn spawner() -> &'static Mutex<mpsc::Sender<(Command, SpawnReply)>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, SpawnReply)>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("tangle-launcher".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning the launcher thread");
        Mutex::new(tx)
    })
}

/// The port of an `http://host:port/...` URL (80/443 when absent).
pub fn url_port(base_url: &str) -> Option<u16> {
    let url = reqwest::Url::parse(base_url).ok()?;
    url.port_or_known_default()
}

/// Whether a server answers HTTP at `base_url` (any status: a server that only speaks
/// POST /chat/completions may 404 a GET, and is still up).
pub async fn is_ready(client: &reqwest::Client, base_url: &str) -> bool {
    let url = format!("{}/models", base_url.trim_end_matches('/'));
    client.get(url).timeout(Duration::from_secs(2)).send().await.is_ok()
}

/// Whether this run has already started the server for `base_url`.
pub fn is_running(base_url: &str) -> bool {
    crate::support::lock(registry()).contains_key(base_url)
}

/// Returns the server for `base_url`, starting it with `launch.command` unless this run
/// already did. Waits until it answers, the command exits, the timeout passes, or
/// `cancelled()` turns true.
pub async fn ensure_running(
    base_url: &str,
    launch: &LaunchSpec,
    spec_dir: &Path,
    log_dir: &Path,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Arc<LaunchedServer>, String> {
    if let Some(server) = crate::support::lock(registry()).get(base_url).cloned() {
        return Ok(server);
    }
    let port = url_port(base_url).ok_or_else(|| format!("cannot read a port from base_url `{base_url}`"))?;
    std::fs::create_dir_all(log_dir).map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    let log = log_dir.join(format!("server-{port}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let log_err = log_file.try_clone().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the tangle binary: {e}"))?;

    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&launch.command)
        .current_dir(spec_dir)
        .env("TANGLE_EXE", &exe)
        .env("TANGLE_PORT", port.to_string())
        .env("TANGLE_PARENT_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err));
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (setpgid, prctl) between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    crate::support::lock(spawner()).send((command, reply_tx)).map_err(|_| "the launcher thread is gone".to_string())?;
    let child = reply_rx
        .recv()
        .map_err(|_| "the launcher thread is gone".to_string())?
        .map_err(|e| format!("cannot start `{}`: {e}", launch.command))?;
    let server = Arc::new(LaunchedServer {
        base_url: base_url.to_string(),
        pid: child.id(),
        log: log.clone(),
        child: Mutex::new(Some(child)),
    });
    crate::support::lock(registry()).insert(base_url.to_string(), Arc::clone(&server));

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs_f64(launch.ready_timeout_s);
    loop {
        if is_ready(&client, base_url).await {
            return Ok(server);
        }
        let exited = {
            let mut guard = crate::support::lock(&server.child);
            guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
        };
        if let Some(status) = exited {
            crate::support::lock(registry()).remove(base_url);
            return Err(format!(
                "the server launched for {base_url} exited ({status}) before answering; its output is in {}:\n{}",
                log.display(),
                tail(&log, 12)
            ));
        }
        if cancelled() || Instant::now() >= deadline {
            crate::support::lock(registry()).remove(base_url);
            server.stop();
            if cancelled() {
                return Err("interrupted while a launched server was starting".into());
            }
            return Err(format!(
                "the server launched for {base_url} did not answer within {:.0} s (raise `launch.ready_timeout_s`); its output is in {}:\n{}",
                launch.ready_timeout_s,
                log.display(),
                tail(&log, 12)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the server this process started for `base_url`, if any.
pub fn stop(base_url: &str) {
    let server = crate::support::lock(registry()).remove(base_url);
    if let Some(server) = server {
        server.stop();
    }
}

/// Stops every server this process started.
pub fn stop_all() {
    let servers: Vec<Arc<LaunchedServer>> = crate::support::lock(registry()).drain().map(|(_, s)| s).collect();
    for server in servers {
        server.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// For servers started by [`ensure_running`]: exit when the tangle process that launched
/// us is gone (it was killed before it could stop us).
pub fn exit_with_launcher() {
    let Some(parent) = std::env::var("TANGLE_PARENT_PID").ok().and_then(|p| p.parse::<libc::pid_t>().ok()) else {
        return;
    };
    // The launch command may run us under a shell that gets the launcher's SIGTERM: die the
    // moment our own parent does, rather than at the next poll, so a request in flight when
    // tangle is killed is never finished (and paid for) with nobody left to record it.
    // SAFETY: prctl and getppid only read or set this process's attributes.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            std::process::exit(0);
        }
    }
    std::thread::Builder::new()
        .name("tangle-parent-watch".into())
        .spawn(move || loop {
            // SAFETY: kill(pid, 0) only checks that the process exists.
            let alive = unsafe { libc::kill(parent, 0) } == 0;
            if !alive {
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(500));
        })
        .ok();
}
