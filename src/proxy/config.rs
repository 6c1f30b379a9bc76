//! The proxy's configuration file (`tangle proxy --config proxy.yaml`).
//!
//! Parsed with the spec's machinery (spanned YAML, a recovering deserializer, `${VAR}`
//! interpolation), so every mistake is reported at once as `file:line:col` with a hint.
//! Secrets are only ever `${VAR}` references: an upstream `api_key` or a client `key`
//! written in clear is an error. Client keys are hashed (sha256) as soon as they are read;
//! the plaintext is not kept. No I/O beyond reading the file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::breaker::{BreakerLimits, DEFAULT_IDLE_RESET, DEFAULT_MAX_CONTINUOUS};
use crate::diagnostic::{did_you_mean, Diagnostic, Report, Span};
use crate::providers::config::{duration_serde, Budget, SecretString, TargetConfig};
use crate::router::{BackoffPolicy, HealthPolicy, RouterPolicy};
use crate::spec::de::{self, describe_path};
use crate::spec::{document, env, SpanIndex};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";

// ---- the file as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    state_dir: Option<String>,
    routes: BTreeMap<String, RouteFile>,
    keys: Vec<KeyFile>,
    #[serde(default)]
    router: RouterFile,
    #[serde(default)]
    target_breakers: BTreeMap<String, LimitsFile>,
    #[serde(default)]
    alerts: AlertsFile,
    #[serde(default)]
    dashboard: DashboardFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    targets: Vec<TargetConfig>,
    budget: Option<Budget>,
    breaker: Option<BreakerFile>,
    capture: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    key: Option<SecretString>,
    key_sha256: Option<String>,
    routes: Option<Vec<String>>,
    budget: Option<Budget>,
    breaker: Option<BreakerFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    budget: Option<Budget>,
    breaker: Option<BreakerFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerFile {
    max_continuous: Option<DurationValue>,
    idle_reset: Option<DurationValue>,
    max_cost_per_hour: Option<f64>,
    max_tokens_per_hour: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterFile {
    failure_threshold: Option<u32>,
    cooldown: Option<DurationValue>,
    backoff_initial: Option<DurationValue>,
    backoff_max: Option<DurationValue>,
    max_retry_after: Option<DurationValue>,
    max_wait_for_target: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsFile {
    webhook: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DashboardFile {
    #[serde(default = "yes")]
    enabled: bool,
}

impl Default for DashboardFile {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn yes() -> bool {
    true
}

/// A duration as written (`30s`, `250ms`, `10h`, `2`, `off`); parsed during validation so
/// an error points at the value itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Secs(f64),
    Text(String),
}

// ---- the resolved configuration ----

/// One model alias clients can ask for, and where it goes.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub alias: String,
    /// In failover order.
    pub targets: Vec<TargetConfig>,
    /// A route breaker exists only when the route sets `budget` or `breaker`.
    pub limits: Option<BreakerLimits>,
    /// JSONL file receiving each answered request as `{messages, reference, …}`: a dataset
    /// `tangle run` reads (distilling from production traffic).
    pub capture: Option<PathBuf>,
}

/// A client key: its name (what the ledger and dashboard show) and the sha256 of its value.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    /// Aliases this key may use; `None` means all.
    pub routes: Option<BTreeSet<String>>,
    pub limits: BreakerLimits,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub file: PathBuf,
    pub listen: SocketAddr,
    /// Holds `ledger.sqlite` (shared with `tangle usage`) and `proxy-breakers.json`.
    pub state_dir: PathBuf,
    pub routes: Vec<RouteConfig>,
    pub keys: Vec<KeyConfig>,
    pub router: RouterPolicy,
    pub target_limits: BTreeMap<String, BreakerLimits>,
    pub alert_webhook: Option<String>,
    pub dashboard: bool,
}

impl ProxyConfig {
    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("ledger.sqlite")
    }

    pub fn breaker_state_path(&self) -> PathBuf {
        self.state_dir.join("proxy-breakers.json")
    }

    /// Where a local client (`tangle breaker`, a browser) reaches the proxy: a wildcard
    /// listen address is reached through loopback.
    pub fn local_url(&self) -> String {
        local_url_for(self.listen)
    }
}

/// `http://ADDR` for a client on this machine; a wildcard address is reached on loopback.
pub fn local_url_for(mut addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}")
}

/// sha256 of a client key, as `key_sha256` takes it (`printf %s "$KEY" | sha256sum`).
pub fn hash_key(key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes()).into()
}

/// Reads and checks a config file, with `${VAR}` from the process environment.
pub fn load_file(file: &Path) -> Result<ProxyConfig, Report> {
    let source = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            let d = Diagnostic::error("unreadable", Span::START, format!("cannot read the proxy config: {e}"))
                .with_hint("check the path; see examples/proxy/proxy.yaml for a complete config");
            return Err(Report::new(file, "", vec![d]));
        }
    };
    load_source(file, &source, &|name| std::env::var(name).ok())
}

/// Checks config text; `file` names it in diagnostics and anchors a relative `state_dir`.
pub fn load_source(file: &Path, source: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<ProxyConfig, Report> {
    let doc = document::read::<ConfigFile>(file, source, lookup)?;
    if !doc.root_is_map {
        let d = Diagnostic::error("wrong-type", Span::START, "the proxy config must be a mapping of sections")
            .with_hint("start from examples/proxy/proxy.yaml: `listen:`, `routes:`, `keys:` …");
        return Err(Report::new(file, &doc.source, vec![d]));
    }
    let Some(raw) = doc.value else {
        return Err(Report::new(file, &doc.source, doc.diagnostics));
    };
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut checker = Checker { spans: &doc.spans, poisoned: &doc.poisoned, diagnostics: Vec::new() };
    let config = checker.resolve(raw, file, dir);
    let mut diagnostics = doc.diagnostics;
    diagnostics.extend(checker.diagnostics);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(Report::new(file, &doc.source, diagnostics));
    }
    Ok(config)
}

struct Checker<'a> {
    spans: &'a SpanIndex,
    poisoned: &'a BTreeSet<String>,
    diagnostics: Vec<Diagnostic>,
}

fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

impl Checker<'_> {
    fn is_poisoned(&self, path: &str) -> bool {
        document::is_poisoned(self.poisoned, path)
    }

    fn error_at(&mut self, span: Span, path: &str, code: &'static str, message: String, hint: impl Into<String>) {
        if !self.is_poisoned(path) {
            self.diagnostics.push(Diagnostic::error(code, span, message).with_hint(hint));
        }
    }

    fn at_value(&mut self, path: &str, code: &'static str, message: String, hint: impl Into<String>) {
        self.error_at(self.spans.value(path), path, code, message, hint);
    }

    fn at_key(&mut self, path: &str, code: &'static str, message: String, hint: impl Into<String>) {
        self.error_at(self.spans.key(path), path, code, message, hint);
    }

    fn duration(&mut self, path: &str, value: &Option<DurationValue>, default: Duration) -> Duration {
        self.optional_duration(path, value, false).flatten().unwrap_or(default)
    }

    /// `Some(None)` is `off` (only where `allow_off`).
    fn optional_duration(
        &mut self,
        path: &str,
        value: &Option<DurationValue>,
        allow_off: bool,
    ) -> Option<Option<Duration>> {
        let parsed = match value.as_ref()? {
            DurationValue::Secs(s) if s.is_finite() && *s >= 0.0 => Ok(Duration::from_secs_f64(*s)),
            DurationValue::Secs(s) => Err(format!("{s} is negative")),
            DurationValue::Text(t) if allow_off && t.trim() == "off" => return Some(None),
            DurationValue::Text(t) => {
                let t = t.trim();
                match t.strip_suffix('h').and_then(|n| n.trim().parse::<f64>().ok()) {
                    Some(h) if h.is_finite() && h >= 0.0 => Ok(Duration::from_secs_f64(h * 3600.0)),
                    _ => duration_serde::parse(t),
                }
            }
        };
        match parsed {
            Ok(d) => Some(Some(d)),
            Err(e) => {
                let hint = if allow_off {
                    "write a duration such as `10h`, `30m`, `45s`, `250ms`, or `off`"
                } else {
                    "write a duration such as `30s`, `250ms`, `5m` or `1h`"
                };
                self.at_value(path, "bad-duration", format!("{} is not a duration: {e}", describe_path(path)), hint);
                None
            }
        }
    }

    fn secret_reference(&mut self, path: &str, what: &str, hint: &str) {
        if let Some(raw) = self.spans.raw(path) {
            if !env::references_env(raw) {
                self.at_value(path, "secret-in-config", format!("{what} is written into the config file"), hint);
            }
        }
    }

    fn limits(
        &mut self,
        path: &str,
        budget: &Option<Budget>,
        breaker: &Option<BreakerFile>,
        default_continuous: Option<Duration>,
    ) -> BreakerLimits {
        let empty = BreakerFile::default();
        let b = breaker.as_ref().unwrap_or(&empty);
        let bpath = format!("{path}.breaker");
        let max_continuous = self
            .optional_duration(&format!("{bpath}.max_continuous"), &b.max_continuous, true)
            .unwrap_or(default_continuous);
        let idle_reset = self.duration(&format!("{bpath}.idle_reset"), &b.idle_reset, DEFAULT_IDLE_RESET);
        if let (Some(limit), Some(_)) = (max_continuous, &b.idle_reset) {
            if idle_reset >= limit {
                self.at_value(
                    &format!("{bpath}.idle_reset"),
                    "out-of-range",
                    "`idle_reset` must be shorter than `max_continuous`, or no streak could ever reach the limit"
                        .into(),
                    "e.g. `max_continuous: 10h` with `idle_reset: 10m`",
                );
            }
        }
        for (field, value) in [("max_cost_per_hour", b.max_cost_per_hour)] {
            if value.is_some_and(|v| v <= 0.0) {
                self.at_value(
                    &format!("{bpath}.{field}"),
                    "out-of-range",
                    format!("`{field}` must be positive"),
                    "remove the key to disable the rule",
                );
            }
        }
        let budget = budget.unwrap_or_default();
        if budget.max_cost_usd.is_some_and(|v| v <= 0.0) {
            self.at_value(
                &format!("{path}.budget.max_cost_usd"),
                "out-of-range",
                "`max_cost_usd` must be positive".into(),
                "remove the key for no cost budget",
            );
        }
        BreakerLimits {
            max_continuous,
            idle_reset,
            max_cost_per_hour: b.max_cost_per_hour,
            max_tokens_per_hour: b.max_tokens_per_hour,
            max_cost_usd: budget.max_cost_usd,
            max_tokens: budget.max_tokens,
        }
    }

    fn resolve(&mut self, raw: ConfigFile, file: &Path, dir: &Path) -> ProxyConfig {
        let listen_text = raw.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                self.at_value(
                    "listen",
                    "bad-address",
                    format!("`listen` is `{listen_text}`, which is not an IP address and port"),
                    "write e.g. `127.0.0.1:8787` (loopback only) or `0.0.0.0:8787` (all interfaces)",
                );
                DEFAULT_LISTEN.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8787)))
            }
        };
        let state_dir = crate::spec::resolve_against(dir, raw.state_dir.as_deref().unwrap_or(".tangle"));

        if raw.routes.is_empty() && !self.is_poisoned("routes") {
            self.at_key(
                "routes",
                "empty-list",
                "`routes` is empty: clients would have no model to ask for".into(),
                "add an alias with its targets, e.g. `routes: { support: { targets: [ … ] } }`",
            );
        }
        let mut routes = Vec::new();
        for (alias, route) in &raw.routes {
            let path = de::child_path("routes", alias);
            if alias.is_empty() || alias.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.at_key(
                    &path,
                    "bad-name",
                    format!("route alias `{alias}` is empty or has spaces"),
                    "aliases are what clients send as `model`; use letters, digits, `-`, `_`, `.`, `:`, `/`",
                );
            }
            if route.targets.is_empty() {
                self.at_key(
                    &format!("{path}.targets"),
                    "empty-list",
                    format!("route `{alias}` has no targets"),
                    "list at least one, e.g. `- { provider: openai, model: gpt-4o-mini, api_key: ${OPENAI_API_KEY} }`",
                );
            }
            let mut names = BTreeSet::new();
            for (i, target) in route.targets.iter().enumerate() {
                let tpath = format!("{path}.targets[{i}]");
                self.target(&tpath, target);
                if !names.insert(target.display_name()) {
                    self.at_value(
                        &tpath,
                        "duplicate-name",
                        format!("route `{alias}` lists target `{}` twice", target.display_name()),
                        "give each target a distinct `name:`",
                    );
                }
            }
            let limits = (route.budget.is_some() || route.breaker.is_some())
                .then(|| self.limits(&path, &route.budget, &route.breaker, Some(DEFAULT_MAX_CONTINUOUS)));
            let capture = route.capture.as_ref().map(|p| crate::spec::resolve_against(dir, p));
            if capture.as_ref().is_some_and(|p| p.is_dir()) {
                self.at_value(
                    &format!("{path}.capture"),
                    "bad-path",
                    "`capture` names a directory".into(),
                    "name a file to append to, e.g. `capture: captures/support.jsonl`",
                );
            }
            routes.push(RouteConfig { alias: alias.clone(), targets: route.targets.clone(), limits, capture });
        }

        let all_targets: BTreeSet<String> =
            raw.routes.values().flat_map(|r| r.targets.iter().map(TargetConfig::display_name)).collect();
        let mut target_limits = BTreeMap::new();
        for (name, limits) in &raw.target_breakers {
            let path = de::child_path("target_breakers", name);
            if !all_targets.contains(name) {
                let hint = match did_you_mean(name, all_targets.iter().map(String::as_str)) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("known targets: {}", all_targets.iter().cloned().collect::<Vec<_>>().join(", ")),
                };
                self.at_key(&path, "unknown-target", format!("no route has a target named `{name}`"), hint);
            }
            // Upstreams serve steadily by design: no continuous-spend rule unless asked for.
            let resolved = self.limits(&path, &limits.budget, &limits.breaker, None);
            target_limits.insert(name.clone(), resolved);
        }

        let keys = self.keys(&raw);

        let r = &raw.router;
        let defaults = RouterPolicy::default();
        let router = RouterPolicy {
            backoff: BackoffPolicy {
                initial: self.duration("router.backoff_initial", &r.backoff_initial, Duration::from_millis(200)),
                max: self.duration("router.backoff_max", &r.backoff_max, Duration::from_secs(5)),
                multiplier: defaults.backoff.multiplier,
                max_retry_after: self.duration("router.max_retry_after", &r.max_retry_after, Duration::from_secs(10)),
            },
            health: HealthPolicy {
                failure_threshold: r.failure_threshold.unwrap_or(defaults.health.failure_threshold).max(1),
                cooldown: self.duration("router.cooldown", &r.cooldown, defaults.health.cooldown),
            },
            max_wait_for_target: self.duration("router.max_wait_for_target", &r.max_wait_for_target, Duration::ZERO),
        };

        if let Some(url) = &raw.alerts.webhook {
            if !is_http_url(url) {
                self.at_value(
                    "alerts.webhook",
                    "bad-url",
                    format!("`{url}` is not an http(s) URL"),
                    "write the full URL the alert is POSTed to, e.g. `https://hooks.slack.com/services/…`",
                );
            }
        }

        ProxyConfig {
            file: file.to_path_buf(),
            listen,
            state_dir,
            routes,
            keys,
            router,
            target_limits,
            alert_webhook: raw.alerts.webhook.clone(),
            dashboard: raw.dashboard.enabled,
        }
    }

    fn target(&mut self, path: &str, target: &TargetConfig) {
        if target.model.trim().is_empty() {
            self.at_value(
                &format!("{path}.model"),
                "empty-value",
                "the target's `model` is empty".into(),
                "name the upstream's model, e.g. `gpt-4o-mini`",
            );
        }
        let var = target.provider.api_key_variable();
        let key_path = format!("{path}.api_key");
        self.secret_reference(
            &key_path,
            "an upstream API key",
            &format!(
                "reference it from the environment instead, e.g. `api_key: ${{{var}}}`, and revoke the key you wrote"
            ),
        );
        match (target.provider, &target.base_url) {
            (provider, None) if provider.needs_base_url() => self.at_key(
                path,
                "missing-key",
                "an `openai_compatible` target needs a `base_url`".into(),
                "add `base_url: http://127.0.0.1:8080/v1` (the server's OpenAI-compatible root)",
            ),
            (_, Some(url)) if !is_http_url(url) => self.at_value(
                &format!("{path}.base_url"),
                "bad-url",
                format!("`{url}` is not an http(s) URL"),
                "write the full URL, e.g. `http://127.0.0.1:8080/v1`",
            ),
            _ => {}
        }
        if target.api_key.is_none() && target.provider.needs_api_key() {
            self.at_key(
                path,
                "missing-key",
                format!("a `{}` target needs an `api_key`", target.provider.as_str()),
                format!("add `api_key: ${{{var}}}`"),
            );
        }
        if target.timeout.is_zero() {
            self.at_value(
                &format!("{path}.timeout"),
                "out-of-range",
                "`timeout` must be more than zero".into(),
                "the deadline of one attempt, stream included, e.g. `120s`",
            );
        }
    }

    fn keys(&mut self, raw: &ConfigFile) -> Vec<KeyConfig> {
        if raw.keys.is_empty() && !self.is_poisoned("keys") {
            self.at_key(
                "keys",
                "empty-list",
                "`keys` is empty: no client could authenticate".into(),
                "add `- { name: my-app, key: ${MY_APP_PROXY_KEY} }` (clients send it as their API key)",
            );
        }
        let mut keys = Vec::new();
        let mut names = BTreeSet::new();
        let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let path = format!("keys[{i}]");
            if k.name.trim().is_empty() || k.name.contains(char::is_whitespace) {
                self.at_value(
                    &format!("{path}.name"),
                    "bad-name",
                    "a key's `name` must be non-empty, without spaces".into(),
                    "the name is what the ledger and the dashboard show, e.g. `checkout-service`",
                );
            }
            if !names.insert(k.name.clone()) {
                self.at_value(
                    &format!("{path}.name"),
                    "duplicate-name",
                    format!("two keys are named `{}`", k.name),
                    "names identify keys in the ledger and in breaker ids; make them unique",
                );
            }
            let sha256 = match (&k.key, &k.key_sha256) {
                (Some(key), None) => {
                    self.secret_reference(
                        &format!("{path}.key"),
                        "a client key",
                        "reference it from the environment (`key: ${MY_APP_PROXY_KEY}`) or store its hash in `key_sha256`",
                    );
                    if key.expose().len() < 16 {
                        self.at_value(
                            &format!("{path}.key"),
                            "weak-key",
                            "this client key is shorter than 16 characters".into(),
                            "generate one with `openssl rand -hex 24`",
                        );
                    }
                    Some(hash_key(key.expose()))
                }
                (None, Some(hex_hash)) => {
                    let decoded = hex::decode(hex_hash.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
                    if decoded.is_none() {
                        self.at_value(
                            &format!("{path}.key_sha256"),
                            "bad-hash",
                            "`key_sha256` must be 64 hexadecimal characters".into(),
                            "compute it with `printf %s \"$KEY\" | sha256sum`",
                        );
                    }
                    decoded
                }
                (Some(_), Some(_)) => {
                    self.at_key(
                        &path,
                        "conflicting-keys",
                        format!("key `{}` sets both `key` and `key_sha256`", k.name),
                        "keep one: `key: ${VAR}` is hashed at start-up, `key_sha256` is the hash itself",
                    );
                    None
                }
                (None, None) => {
                    self.at_key(
                        &path,
                        "missing-key",
                        format!("key `{}` has neither `key` nor `key_sha256`", k.name),
                        "add `key: ${MY_APP_PROXY_KEY}`, or `key_sha256:` with its sha256",
                    );
                    None
                }
            };
            if let Some(hash) = sha256 {
                if let Some(other) = hashes.insert(hash, k.name.clone()) {
                    self.at_key(
                        &path,
                        "duplicate-key",
                        format!("keys `{other}` and `{}` have the same value", k.name),
                        "give every client its own key, so usage and breakers stay per client",
                    );
                }
            }
            if let Some(routes) = &k.routes {
                for (j, alias) in routes.iter().enumerate() {
                    if !raw.routes.contains_key(alias) {
                        let hint = match did_you_mean(alias, raw.routes.keys().map(String::as_str)) {
                            Some(best) => format!("did you mean `{best}`?"),
                            None => {
                                format!("routes defined: {}", raw.routes.keys().cloned().collect::<Vec<_>>().join(", "))
                            }
                        };
                        self.at_value(
                            &format!("{path}.routes[{j}]"),
                            "unknown-route",
                            format!("key `{}` allows route `{alias}`, which is not defined", k.name),
                            hint,
                        );
                    }
                }
            }
            let limits = self.limits(&path, &k.budget, &k.breaker, Some(DEFAULT_MAX_CONTINUOUS));
            keys.push(KeyConfig {
                name: k.name.clone(),
                sha256: sha256.unwrap_or_default(),
                routes: k.routes.as_ref().map(|r| r.iter().cloned().collect()),
                limits,
            });
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "APP_KEY" => Some("app-key-0123456789abcdef".into()),
            "UPSTREAM" => Some("sk-upstream-secret".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<ProxyConfig, Report> {
        load_source(Path::new("conf/proxy.yaml"), text, &env)
    }

    const GOOD: &str = "\
listen: 127.0.0.1:9999
routes:
  support:
    targets:
      - { name: student, provider: openai_compatible, model: s, base_url: http://127.0.0.1:1/v1 }
      - { name: claude, provider: anthropic, model: c, api_key: '${UPSTREAM}', timeout: 30s }
    budget: { max_cost_usd: 10 }
keys:
  - name: app
    key: ${APP_KEY}
    budget: { max_tokens: 1000 }
    breaker: { max_continuous: 2h, idle_reset: 5m, max_cost_per_hour: 1.5 }
  - name: ops
    key_sha256: 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
    routes: [support]
    breaker: { max_continuous: off }
target_breakers:
  claude: { breaker: { max_cost_per_hour: 3 } }
router: { cooldown: 10s, backoff_initial: 50ms }
alerts: { webhook: http://127.0.0.1:2/hook }
";

    #[test]
    fn a_complete_config_resolves() {
        let c = load(GOOD).unwrap_or_else(|r| panic!("{}", r.render_human()));
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.state_dir, Path::new("conf/.tangle"));
        assert_eq!(c.routes[0].targets.len(), 2);
        assert_eq!(c.routes[0].targets[1].api_key.as_ref().unwrap().expose(), "sk-upstream-secret");
        assert_eq!(c.routes[0].targets[1].timeout, Duration::from_secs(30));
        assert_eq!(c.routes[0].limits.as_ref().unwrap().max_cost_usd, Some(10.0));
        let app = &c.keys[0];
        assert_eq!(app.sha256, hash_key("app-key-0123456789abcdef"));
        assert_eq!(app.limits.max_continuous, Some(Duration::from_secs(7200)));
        assert_eq!(app.limits.idle_reset, Duration::from_secs(300));
        assert_eq!(app.limits.max_tokens, Some(1000));
        assert_eq!(c.keys[1].sha256, hash_key("hello"));
        assert_eq!(c.keys[1].limits.max_continuous, None);
        assert_eq!(c.target_limits["claude"].max_continuous, None);
        assert_eq!(c.router.health.cooldown, Duration::from_secs(10));
        assert_eq!(c.router.backoff.initial, Duration::from_millis(50));
        assert_eq!(c.local_url(), "http://127.0.0.1:9999");
        assert!(c.dashboard);
    }

    #[test]
    fn every_mistake_is_reported_with_its_position_and_a_fix() {
        let text = "\
listen: localhost
routes:
  support:
    targets:
      - { provider: anthropic, model: c, api_key: sk-live-written-here }
      - { provider: openai_compatible, model: m }
keys:
  - name: app
    key: short
    routes: [suport]
  - { name: ops }
target_breakers:
  claud: {}
router: { cooldown: soon }
";
        let report = load(text).expect_err("invalid");
        let text = report.render_human();
        for expected in [
            "conf/proxy.yaml:1:9: error: `listen` is `localhost`",
            "conf/proxy.yaml:5:51: error: an upstream API key is written into the config file",
            "error: an `openai_compatible` target needs a `base_url`",
            "conf/proxy.yaml:9:10: error: a client key is written into the config file",
            "error: this client key is shorter than 16 characters",
            "error: key `app` allows route `suport`, which is not defined",
            "hint: did you mean `support`?",
            "error: key `ops` has neither `key` nor `key_sha256`",
            "error: no route has a target named `claud`",
            "error: `router.cooldown` is not a duration",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
        // Messages never quote a key; only the echoed source line shows what the file says.
        let quoted = text.lines().filter(|l| l.contains("sk-live-written-here")).collect::<Vec<_>>();
        assert!(quoted.iter().all(|l| l.starts_with("5 |")), "{quoted:?}");
    }

    #[test]
    fn undefined_variables_and_unknown_keys_point_at_the_file() {
        let text = "routes:\n  r:\n    targets: [{ provider: openai, model: m, api_key: '${NOPE}' }]\n    retries: 3\nkeys: []\n";
        let report = load(text).expect_err("invalid");
        let text = report.render_human();
        assert!(text.contains("environment variable `NOPE` is not set"), "{text}");
        assert!(text.contains("unknown key `retries` in `routes.r`"), "{text}");
        assert!(text.contains("`keys` is empty"), "{text}");
        assert!(!text.contains("sk-upstream-secret"));
    }
}
