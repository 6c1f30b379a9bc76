//! What `tangle proxy` and `tangle breaker` do once the CLI has parsed their flags.

use std::path::Path;

use super::board::BreakerView;
use super::config::{self, ProxyConfig};
use super::Proxy;
use crate::exit::Exit;

fn load(config: &Path) -> Result<ProxyConfig, Exit> {
    config::load_file(config).map_err(|report| {
        eprint!("{}", report.render_human());
        Exit::Usage
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        Exit::Runtime
    })
}

/// `tangle proxy --config FILE [--check]`: serves until Ctrl-C; SIGHUP reloads the file.
pub fn run_proxy(config_path: &Path, check_only: bool) -> Exit {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    if check_only {
        eprintln!(
            "{}: ok ({} route{}, {} key{})",
            config_path.display(),
            config.routes.len(),
            if config.routes.len() == 1 { "" } else { "s" },
            config.keys.len(),
            if config.keys.len() == 1 { "" } else { "s" }
        );
        return Exit::Success;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(exit) => return exit,
    };
    rt.block_on(async {
        let listen = config.listen;
        let dashboard = config.dashboard;
        let proxy = match Proxy::start(config) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Runtime;
            }
        };
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                eprintln!("  = hint: another process holds the port, or change `listen:` in {}", config_path.display());
                return Exit::Runtime;
            }
        };
        let addr = listener.local_addr().unwrap_or(listen);
        let local = config::local_url_for(addr);
        eprintln!("tangle proxy: OpenAI-compatible endpoint at {local}/v1");
        if dashboard {
            eprintln!("tangle proxy: dashboard at {local}/dashboard (loopback only), metrics at /metrics");
        }
        spawn_reload_on_hangup(proxy.clone(), config_path.to_path_buf());
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("tangle proxy: stopping; finishing in-flight requests (Ctrl-C again to quit now)");
            tokio::spawn(async {
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(Exit::Interrupted.code());
            });
        };
        match super::serve(listener, proxy, shutdown).await {
            Ok(()) => Exit::Success,
            Err(e) => {
                eprintln!("error: the proxy stopped: {e}");
                Exit::Runtime
            }
        }
    })
}

#[cfg(unix)]
fn spawn_reload_on_hangup(proxy: std::sync::Arc<Proxy>, path: std::path::PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: cannot watch SIGHUP ({e}); config reload needs a restart");
            return;
        }
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match config::load_file(&path) {
                Err(report) => {
                    eprint!("{}", report.render_human());
                    eprintln!("tangle proxy: reload refused; still serving the previous config");
                }
                Ok(config) => match proxy.apply(config) {
                    Ok(warnings) => {
                        for w in warnings {
                            eprintln!("warning: {w}");
                        }
                        eprintln!("tangle proxy: reloaded {}", path.display());
                    }
                    Err(e) => eprintln!("error: reload failed ({e}); still serving the previous config"),
                },
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_hangup(_proxy: std::sync::Arc<Proxy>, _path: std::path::PathBuf) {}

/// What `tangle breaker` asks of a running proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerAction {
    List,
    Confirm(String),
    Reset(String),
}

/// `tangle breaker list|confirm ID|reset ID --config FILE`: talks to the running proxy's
/// admin API on loopback.
pub fn run_breaker(config_path: &Path, action: &BreakerAction, json: bool) -> Exit {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(exit) => return exit,
    };
    let base = config.local_url();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let request = match action {
            BreakerAction::List => client.get(format!("{base}/admin/breakers")),
            BreakerAction::Confirm(id) | BreakerAction::Reset(id) => {
                let verb = if matches!(action, BreakerAction::Confirm(_)) { "confirm" } else { "reset" };
                let id = id.replace('/', "%2F");
                client.post(format!("{base}/admin/breakers/{id}/{verb}")).header("x-tangle-admin", "1")
            }
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: no proxy answers at {base} ({e})");
                eprintln!("  = hint: start it with `tangle proxy --config {}`", config_path.display());
                return Exit::Runtime;
            }
        };
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("unexpected answer");
            eprintln!("error: {message}");
            return if status.is_client_error() { Exit::Usage } else { Exit::Runtime };
        }
        if json {
            println!("{body:#}");
            return Exit::Success;
        }
        match action {
            BreakerAction::List => {
                let views: Vec<BreakerView> = serde_json::from_value(body["breakers"].clone()).unwrap_or_default();
                eprint!("{}", render_list(&views));
            }
            BreakerAction::Confirm(id) => eprintln!("confirmed `{id}`: requests it stopped are accepted again"),
            BreakerAction::Reset(id) => eprintln!("reset `{id}`: its counters start from zero"),
        }
        Exit::Success
    })
}

/// The human table of `tangle breaker list`.
pub fn render_list(views: &[BreakerView]) -> String {
    let width = views.iter().map(|v| v.id.len()).max().unwrap_or(7).max(7);
    let mut out = format!("{:<width$}  {:<8}  {:>12}  {:>12}  why\n", "breaker", "state", "budget tok", "budget USD");
    for v in views {
        out.push_str(&format!(
            "{:<width$}  {:<8}  {:>12}  {:>12.4}  {}\n",
            v.id,
            v.state,
            v.budget_tokens,
            v.budget_cost_usd,
            v.message.as_deref().unwrap_or("")
        ));
    }
    let tripped = views.iter().filter(|v| v.state == "tripped").count();
    if tripped > 0 {
        out.push_str(&format!("{tripped} tripped: `tangle breaker confirm ID` resumes one (or use the dashboard)\n"));
    }
    out
}
