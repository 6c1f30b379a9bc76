//! `tangle proxy`: an OpenAI-compatible gateway in front of ordered upstream targets.
//!
//! A client sends `model: ALIAS` with its proxy key; the proxy authenticates the key (by
//! sha256), admits the request through the key's and the route's spend breakers (budget
//! reservations included), and sends it through the route's [`Router`] — the same router as
//! the labeling stage: retries with backoff honouring Retry-After, failover, per-target
//! health with cool-down. Every upstream attempt becomes a ledger row (`run_id = "proxy"`,
//! `stage = ALIAS`, `api_key_id = key name`), so `tangle usage --by key` reports proxy spend.
//!
//! Streaming follows the rule in [`relay`]: failover before the first content byte is
//! invisible; after it, the client gets one error event and the stream ends (no splicing).
//!
//! Endpoints: `POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic; the
//! same routes, keys and breakers), `GET /v1/models`, `GET /health`, `GET /metrics`;
//! and, for loopback peers only, `GET /dashboard` (live page), `GET /dashboard/events`
//! (SSE snapshots), `GET /dashboard/state`, `GET /admin/breakers`,
//! `POST /admin/breakers/{id}/confirm|reset` (with header `x-tangle-admin: 1`, which a
//! cross-site form cannot send).
//!
//! A route may `capture` each answered request to a JSONL file that `tangle run` reads as
//! a dataset. What it does not do: tools/function calling, images, logprobs. Upstream
//! secrets never leave the provider layer; client keys are kept hashed.

pub mod alert;
pub mod board;
pub mod breaker;
pub mod command;
pub mod config;
mod dashboard;
pub mod metrics;
mod relay;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use self::board::{BoardError, BoardEvent, BreakerBoard, BreakerSpec, BreakerView, PersistedBreakers};
use self::breaker::Trip;
use self::config::{hash_key, KeyConfig, ProxyConfig};
use self::metrics::Metrics;
use self::relay::{ProxyTarget, Relay, RelayItem, BREAKER_OPEN_PREFIX};
use self::wire::ClientError;
use crate::budget::{Reservation, Spend};
use crate::ledger::{now_ms, CallRecord, GroupBy, Ledger, LedgerError, UsageFilter};
use crate::providers::config::Pricing;
use crate::providers::{build_provider, default_http_client, ChatRequest, Provider, ProviderError};
use crate::router::{Attempt, AttemptOutcome, RouteError, Router, RouterBuildError};
use crate::serve::protocol;
use crate::support::clock_now;

/// The ledger's `run_id` for proxy traffic.
pub const LEDGER_RUN_ID: &str = "proxy";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot open the ledger {path}: {source}")]
    Ledger { path: PathBuf, source: LedgerError },
    #[error("cannot read the breaker state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("route `{alias}`: {source}")]
    Route { alias: String, source: RouterBuildError },
    #[error("route `{alias}`: {source}")]
    Provider { alias: String, source: ProviderError },
    #[error("cannot build the HTTP client: {0}")]
    Http(ProviderError),
    #[error("route `{alias}`: cannot open the capture file {path}: {source}")]
    Capture { alias: String, path: PathBuf, source: std::io::Error },
}

/// One alias and its router.
struct Route {
    alias: String,
    router: Router,
    breaker_id: Option<String>,
    /// The dearest input and output prices among the targets: reservations assume the worst.
    max_pricing: Pricing,
    cooldown_secs: u64,
    capture: Option<Capture>,
}

/// An append-only JSONL file of answered requests. One `write` per line on an O_APPEND
/// file, so lines from concurrent requests never interleave.
struct Capture {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
}

impl Capture {
    fn open(path: &std::path::Path) -> std::io::Result<Capture> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Capture { path: path.to_path_buf(), file: std::sync::Mutex::new(file) })
    }

    fn append(&self, id: &str, route: &str, key: &str, target: &str, chat: &ChatRequest, text: &str) {
        use std::io::Write;
        let line = json!({
            "id": id,
            "messages": chat.messages,
            "reference": text,
            "route": route,
            "target": target,
            "key": key,
            "at": crate::timefmt::now_rfc3339(),
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        if let Err(e) = crate::support::lock(&self.file).write_all(&bytes) {
            eprintln!("error: cannot append to the capture file {}: {e}", self.path.display());
        }
    }
}

impl Route {
    fn estimate(&self, chat: &ChatRequest) -> Spend {
        let input = chat.estimated_input_tokens();
        let output = u64::from(chat.params.max_tokens.unwrap_or(256));
        Spend { tokens: input + output, cost_usd: self.max_pricing.cost_usd(input, output) }
    }
}

/// What a config turns into; swapped whole on reload, so a request keeps the routes it
/// started with.
struct Live {
    config: ProxyConfig,
    routes: BTreeMap<String, Arc<Route>>,
    keys: HashMap<[u8; 32], Arc<KeyConfig>>,
}

pub struct Proxy {
    live: RwLock<Arc<Live>>,
    board: Arc<BreakerBoard>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    client: reqwest::Client,
    /// Bumped on every breaker event, so the dashboard pushes at once.
    changes: watch::Sender<u64>,
    /// Set when the server starts shutting down: dashboard streams end, so the graceful
    /// drain waits only for real requests.
    closing: watch::Sender<bool>,
    started_at: Instant,
}

fn key_id(name: &str) -> String {
    format!("key:{name}")
}

fn read_persisted(path: &std::path::Path) -> Result<PersistedBreakers, ProxyError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ProxyError::State {
            path: path.to_path_buf(),
            message: format!("{e}; fix or remove the file"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PersistedBreakers::default()),
        Err(e) => Err(ProxyError::State { path: path.to_path_buf(), message: e.to_string() }),
    }
}

impl Proxy {
    /// Opens the ledger, restores breaker state, builds the routes and starts the task that
    /// turns breaker events into alerts. Call inside a tokio runtime.
    pub fn start(config: ProxyConfig) -> Result<Arc<Proxy>, ProxyError> {
        let ledger_path = config.ledger_path();
        if let Some(dir) = ledger_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ProxyError::Ledger {
                path: ledger_path.clone(),
                source: LedgerError::Write(e.to_string()),
            })?;
        }
        let ledger =
            Arc::new(Ledger::open(&ledger_path).map_err(|source| ProxyError::Ledger { path: ledger_path, source })?);
        let persisted = read_persisted(&config.breaker_state_path())?;
        let client = default_http_client().map_err(ProxyError::Http)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let specs = breaker_specs(&config, &ledger);
        let board = Arc::new(BreakerBoard::new(specs, &persisted, events_tx));
        let live = build_live(config, &board, &client)?;
        let proxy = Arc::new(Proxy {
            live: RwLock::new(Arc::new(live)),
            board,
            ledger,
            metrics: Metrics::default(),
            client,
            changes: watch::channel(0).0,
            closing: watch::channel(false).0,
            started_at: clock_now(),
        });
        tokio::spawn(run_events(Arc::downgrade(&proxy), events_rx));
        Ok(proxy)
    }

    fn live(&self) -> Arc<Live> {
        // Poisoning needs a panic while swapping an Arc; the old value is still whole.
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn config(&self) -> ProxyConfig {
        self.live().config.clone()
    }

    /// Applies a new config (SIGHUP): new routes and keys for new requests, in-flight ones
    /// finish on the old; breakers keep their state. `listen` and `state_dir` need a restart.
    pub fn apply(&self, config: ProxyConfig) -> Result<Vec<String>, ProxyError> {
        let old = self.live();
        let mut warnings = Vec::new();
        if config.listen != old.config.listen {
            warnings.push(format!("`listen` changed to {}: restart the proxy to move it", config.listen));
        }
        if config.state_dir != old.config.state_dir {
            warnings.push("`state_dir` changed: restart the proxy to use the new ledger".to_string());
        }
        let live = build_live(config, &self.board, &self.client)?;
        self.board.sync(breaker_specs(&live.config, &self.ledger), &PersistedBreakers::default());
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        self.changes.send_modify(|v| *v += 1);
        Ok(warnings)
    }

    pub fn breakers(&self) -> Vec<BreakerView> {
        self.board.views()
    }

    pub fn confirm(&self, id: &str) -> Result<Trip, BoardError> {
        self.board.confirm(id)
    }

    pub fn reset(&self, id: &str) -> Result<(), BoardError> {
        self.board.reset(id)
    }

    /// The HTTP application. Serve it with connect info (see [`serve`]): the dashboard and
    /// admin routes check that the peer is on loopback.
    pub fn app(self: &Arc<Self>) -> axum::Router {
        let mut admin = axum::Router::new();
        if self.live().config.dashboard {
            admin = admin
                .route("/dashboard", get(dashboard::page))
                .route("/dashboard/events", get(dashboard::events))
                .route("/dashboard/state", get(dashboard::state));
        }
        let admin = admin
            .route("/admin/breakers", get(list_breakers))
            .route("/admin/breakers/{id}/confirm", post(confirm_breaker))
            .route("/admin/breakers/{id}/reset", post(reset_breaker))
            .route_layer(axum::middleware::from_fn(loopback_only));
        axum::Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/messages", post(messages))
            .route("/v1/models", get(list_models))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/metrics", get(metrics_text))
            .merge(admin)
            .with_state(self.clone())
    }
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = proxy.app().into_make_service_with_connect_info::<SocketAddr>();
    let closing = proxy.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

fn breaker_specs(config: &ProxyConfig, ledger: &Ledger) -> Vec<BreakerSpec> {
    let totals = |group: GroupBy| -> HashMap<String, Spend> {
        let filter = UsageFilter { run_id: Some(LEDGER_RUN_ID.into()), stage: None };
        match ledger.totals(group, &filter) {
            Ok(rows) => rows
                .into_iter()
                .map(|r| (r.key, Spend { tokens: r.input_tokens + r.output_tokens, cost_usd: r.cost_usd }))
                .collect(),
            Err(e) => {
                eprintln!("warning: cannot read past proxy spend from the ledger ({e}); budgets start from zero");
                HashMap::new()
            }
        }
    };
    let (by_key, by_route, by_target) = (totals(GroupBy::ApiKey), totals(GroupBy::Stage), totals(GroupBy::Target));
    let mut specs = Vec::new();
    for k in &config.keys {
        let total = by_key.get(&k.name).copied().unwrap_or_default();
        specs.push(BreakerSpec { id: key_id(&k.name), limits: k.limits.clone(), total });
    }
    for r in &config.routes {
        if let Some(limits) = &r.limits {
            let total = by_route.get(&r.alias).copied().unwrap_or_default();
            specs.push(BreakerSpec { id: format!("route:{}", r.alias), limits: limits.clone(), total });
        }
    }
    for (name, limits) in &config.target_limits {
        let total = by_target.get(name).copied().unwrap_or_default();
        specs.push(BreakerSpec { id: format!("target:{name}"), limits: limits.clone(), total });
    }
    specs
}

fn build_live(config: ProxyConfig, board: &Arc<BreakerBoard>, client: &reqwest::Client) -> Result<Live, ProxyError> {
    let mut routes = BTreeMap::new();
    for route in &config.routes {
        let mut targets: Vec<(crate::providers::config::TargetConfig, Arc<dyn Provider>)> = Vec::new();
        let mut max_pricing = Pricing::default();
        for (index, target) in route.targets.iter().enumerate() {
            let inner = build_provider(target, client)
                .map_err(|source| ProxyError::Provider { alias: route.alias.clone(), source })?;
            let name = target.display_name();
            let breaker_id = config.target_limits.contains_key(&name).then(|| format!("target:{name}"));
            let wrapped = ProxyTarget::new(index, target.clone(), inner, board.clone(), breaker_id);
            if let Some(p) = target.pricing {
                max_pricing.input_per_mtok = max_pricing.input_per_mtok.max(p.input_per_mtok);
                max_pricing.output_per_mtok = max_pricing.output_per_mtok.max(p.output_per_mtok);
            }
            targets.push((target.clone(), Arc::new(wrapped)));
        }
        let router = Router::with_providers(targets, config.router.clone())
            .map_err(|source| ProxyError::Route { alias: route.alias.clone(), source })?;
        let capture = match &route.capture {
            Some(path) => Some(Capture::open(path).map_err(|source| ProxyError::Capture {
                alias: route.alias.clone(),
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let entry = Route {
            alias: route.alias.clone(),
            router,
            breaker_id: route.limits.as_ref().map(|_| format!("route:{}", route.alias)),
            max_pricing,
            cooldown_secs: config.router.health.cooldown.as_secs().max(1),
            capture,
        };
        routes.insert(route.alias.clone(), Arc::new(entry));
    }
    let keys = config.keys.iter().map(|k| (k.sha256, Arc::new(k.clone()))).collect();
    Ok(Live { config, routes, keys })
}

/// Turns breaker events into a log line, the persisted state file, a webhook POST and a
/// dashboard push, in event order.
async fn run_events(proxy: Weak<Proxy>, mut events: mpsc::UnboundedReceiver<BoardEvent>) {
    while let Some(event) = events.recv().await {
        let Some(proxy) = proxy.upgrade() else { return };
        let config = proxy.config();
        let payload = alert::payload(&event, &config.file.display().to_string());
        eprintln!("{}", alert::log_line(&payload));
        let path = config.breaker_state_path();
        let state = serde_json::to_vec_pretty(&proxy.board.persisted()).unwrap_or_default();
        let written = tokio::task::spawn_blocking(move || crate::fsutil::write_atomic(&path, &state)).await;
        if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
            eprintln!("error: cannot save breaker state to {}: {e}", config.breaker_state_path().display());
        }
        if let Some(url) = config.alert_webhook.clone() {
            let client = proxy.client.clone();
            tokio::spawn(async move {
                if let Err(e) = alert::deliver(&client, &url, &payload).await {
                    eprintln!("error: alert webhook {url} failed after 3 tries: {e}");
                }
            });
        }
        proxy.changes.send_modify(|v| *v += 1);
    }
}

// ---- authentication and admission ----

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization").and_then(|v| v.strip_prefix("Bearer ")).or_else(|| header("x-api-key")).map(str::trim)
}

fn authenticate(live: &Live, headers: &HeaderMap) -> Result<Arc<KeyConfig>, ClientError> {
    let Some(key) = presented_key(headers).filter(|k| !k.is_empty()) else {
        return Err(ClientError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "no API key: send your proxy key as `Authorization: Bearer KEY` (the OpenAI clients' `api_key`)",
        )
        .code("missing_api_key"));
    };
    // The hash is what is stored; a lookup by hash reveals nothing about other keys.
    live.keys.get(&hash_key(key)).cloned().ok_or_else(|| {
        ClientError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "the API key is not valid for this proxy")
            .code("invalid_api_key")
    })
}

fn breaker_refusal(refusal: &breaker::Refusal) -> ClientError {
    ClientError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "breaker_open",
        format!(
            "circuit breaker `{}` is open: {}. Requests resume after an operator confirms it \
             (`tangle breaker confirm {}` or the proxy dashboard).",
            refusal.id, refusal.trip.message, refusal.id
        ),
    )
    .code("breaker_open")
}

fn route_error(route: &Route, error: &RouteError) -> ClientError {
    match error {
        RouteError::RequestRejected { target, source } => {
            let (status, message) = match source {
                ProviderError::Http { status, message, .. } => {
                    (StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST), message.clone())
                }
                other => (StatusCode::BAD_REQUEST, other.to_string()),
            };
            ClientError::new(
                status,
                "invalid_request_error",
                format!("upstream `{target}` rejected the request: {message}"),
            )
        }
        RouteError::AllTargetsFailed { source: ProviderError::Config(message), .. }
            if message.starts_with(BREAKER_OPEN_PREFIX) =>
        {
            ClientError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "breaker_open",
                format!(
                    "every target of `{}` is stopped by a circuit breaker; the last: {}",
                    route.alias,
                    &message[BREAKER_OPEN_PREFIX.len()..]
                ),
            )
            .code("breaker_open")
        }
        RouteError::AllTargetsFailed { target, source } => ClientError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("every target of `{}` failed; the last, `{target}`, with: {source}", route.alias),
        )
        .code("upstream_failed"),
        RouteError::NoTargetAvailable => ClientError {
            retry_after: Some(route.cooldown_secs),
            ..ClientError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                format!("every target of `{}` is cooling down after failures; retry shortly", route.alias),
            )
            .code("no_target_available")
        },
    }
}

/// One admitted request, and what finishing it must account for.
struct Admitted {
    proxy: Arc<Proxy>,
    route: Arc<Route>,
    key: Arc<KeyConfig>,
    request_id: String,
    created: u64,
    started: Instant,
    reservations: Vec<(String, Reservation)>,
}

fn ledger_status(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Ok => "ok".into(),
        AttemptOutcome::Degraded => "degraded".into(),
        AttemptOutcome::Failed { message, .. } if message.contains(BREAKER_OPEN_PREFIX) => "breaker_open".into(),
        AttemptOutcome::Failed { kind, .. } => kind.clone(),
    }
}

impl Admitted {
    fn capture(&self, chat: &ChatRequest, response: &crate::providers::ChatResponse, target: &str) {
        if let Some(capture) = &self.route.capture {
            capture.append(&self.request_id, &self.route.alias, &self.key.name, target, chat, &response.text);
        }
    }

    /// Meters a finished request: ledger rows, counters, breaker settlement.
    fn finish(self, attempts: Vec<Attempt>, status: StatusCode) {
        let end = clock_now();
        let (mut input, mut output, mut cost) = (0, 0, 0.0);
        let timestamp_ms = now_ms();
        let mut rows = Vec::with_capacity(attempts.len());
        for a in &attempts {
            input += a.usage.input_tokens;
            output += a.usage.output_tokens;
            cost += a.cost_usd;
            let ok = matches!(a.outcome, AttemptOutcome::Ok | AttemptOutcome::Degraded);
            self.proxy.metrics.attempt(&a.target, ok, a.usage.input_tokens, a.usage.output_tokens, a.cost_usd);
            rows.push(CallRecord {
                run_id: LEDGER_RUN_ID.into(),
                stage: self.route.alias.clone(),
                target: a.target.clone(),
                provider: a.provider.into(),
                model: a.model.clone(),
                api_key_id: Some(self.key.name.clone()),
                request_id: Some(self.request_id.clone()),
                input_tokens: a.usage.input_tokens,
                output_tokens: a.usage.output_tokens,
                cost_usd: a.cost_usd,
                latency_ms: a.latency.as_millis() as u64,
                status: ledger_status(&a.outcome),
                timestamp_ms,
            });
        }
        let elapsed = end.saturating_duration_since(self.started);
        self.proxy.metrics.request(&self.route.alias, &self.key.name, status.as_u16(), input, output, cost, elapsed);
        let actual = Spend { tokens: input + output, cost_usd: cost };
        self.proxy.board.settle(&self.reservations, &[], actual, self.started, end);
        if !rows.is_empty() {
            let ledger = self.proxy.ledger.clone();
            tokio::spawn(async move {
                if let Err(e) = ledger.record(rows).await {
                    eprintln!("error: proxy ledger write failed: {e}");
                }
            });
        }
    }
}

/// Which API the client speaks; decides every byte of the answer, errors included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// OpenAI Chat Completions; `include_usage` is the request's `stream_options`.
    OpenAi { include_usage: bool },
    /// Anthropic Messages.
    Anthropic,
}

impl Dialect {
    fn error(self, e: ClientError) -> Response {
        let breaker = e.code == Some("breaker_open");
        let mut response = match self {
            Dialect::OpenAi { .. } => e.into_response(),
            Dialect::Anthropic => {
                let mut r = (e.status, Json(wire::anthropic_error(&e))).into_response();
                if let Some(secs) = e.retry_after {
                    r.headers_mut().insert("retry-after", HeaderValue::from(secs));
                }
                r
            }
        };
        if breaker {
            // Retrying cannot help until an operator acts; the OpenAI and Anthropic SDKs
            // honour this header.
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }

    fn body(self, id: &str, created: u64, alias: &str, response: &crate::providers::ChatResponse) -> Response {
        match self {
            Dialect::OpenAi { .. } => Json(wire::completion(id, created, alias, response)).into_response(),
            Dialect::Anthropic => Json(wire::anthropic_message(id, alias, response)).into_response(),
        }
    }
}

async fn chat_completions(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(proxy, headers, &body, false).await
}

async fn messages(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(proxy, headers, &body, true).await
}

async fn handle(proxy: Arc<Proxy>, headers: HeaderMap, body: &[u8], anthropic: bool) -> Response {
    let started = clock_now();
    let live = proxy.live();
    let parsed = if anthropic { wire::parse_messages_request(body) } else { wire::parse_request(body) };
    let dialect = match (&parsed, anthropic) {
        (_, true) => Dialect::Anthropic,
        (Ok(r), false) => Dialect::OpenAi { include_usage: r.include_usage },
        (Err(_), false) => Dialect::OpenAi { include_usage: false },
    };
    let key = match authenticate(&live, &headers) {
        Ok(k) => k,
        Err(e) => {
            proxy.metrics.request("-", "-", e.status.as_u16(), 0, 0, 0.0, started.elapsed());
            return dialect.error(e);
        }
    };
    let refuse = |alias: &str, e: ClientError| {
        proxy.metrics.request(alias, &key.name, e.status.as_u16(), 0, 0, 0.0, started.elapsed());
        dialect.error(e)
    };
    let request = match parsed {
        Ok(r) => r,
        Err(e) => return refuse("-", e),
    };
    let Some(route) = live.routes.get(&request.alias).cloned() else {
        let known: Vec<&str> = allowed_aliases(&live, &key).collect();
        let e = ClientError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("model `{}` is not a route of this proxy; available: {}", request.alias, known.join(", ")),
        )
        .code("model_not_found");
        return refuse("-", ClientError { param: Some("model"), ..e });
    };
    if key.routes.as_ref().is_some_and(|allowed| !allowed.contains(&route.alias)) {
        let known: Vec<&str> = allowed_aliases(&live, &key).collect();
        let e = ClientError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!("key `{}` may not use model `{}`; it may use: {}", key.name, route.alias, known.join(", ")),
        )
        .code("model_not_allowed");
        return refuse(&route.alias, e);
    }
    let kid = key_id(&key.name);
    let mut ids = vec![kid.as_str()];
    if let Some(id) = &route.breaker_id {
        ids.push(id);
    }
    let reservations = match proxy.board.admit(&ids, route.estimate(&request.chat)) {
        Ok(r) => r,
        Err(refusal) => return refuse(&route.alias, breaker_refusal(&refusal)),
    };
    let id = match dialect {
        Dialect::OpenAi { .. } => protocol::completion_id(),
        Dialect::Anthropic => protocol::completion_id().replace("chatcmpl-", "msg_"),
    };
    let admitted = Admitted {
        proxy: proxy.clone(),
        route,
        key,
        request_id: id,
        created: protocol::unix_now(),
        started,
        reservations,
    };
    if request.stream {
        stream_completion(admitted, request.chat, dialect).await
    } else {
        complete(admitted, request.chat, dialect).await
    }
}

fn allowed_aliases<'a>(live: &'a Live, key: &'a KeyConfig) -> impl Iterator<Item = &'a str> {
    live.routes.keys().map(String::as_str).filter(move |a| key.routes.as_ref().is_none_or(|r| r.contains(*a)))
}

fn with_tangle_headers(mut response: Response, request_id: &str, target: Option<&str>) -> Response {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-tangle-request-id", v);
    }
    if let Some(v) = target.and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.insert("x-tangle-target", v);
    }
    response
}

async fn complete(admitted: Admitted, chat: ChatRequest, dialect: Dialect) -> Response {
    let (request_id, created, alias) = (admitted.request_id.clone(), admitted.created, admitted.route.alias.clone());
    // Runs to the end even if the client leaves: the upstream bills the call either way,
    // so it must be metered.
    let task = tokio::spawn(async move {
        let route = admitted.route.clone();
        match route.router.send(&chat).await {
            Ok(routed) => {
                admitted.capture(&chat, &routed.response, &routed.target);
                admitted.finish(routed.attempts, StatusCode::OK);
                Ok((routed.response, routed.target))
            }
            Err(failure) => {
                let error = route_error(&route, &failure.error);
                admitted.finish(failure.attempts, error.status);
                Err(error)
            }
        }
    });
    match task.await {
        Ok(Ok((response, target))) => {
            with_tangle_headers(dialect.body(&request_id, created, &alias, &response), &request_id, Some(&target))
        }
        Ok(Err(error)) => with_tangle_headers(dialect.error(error), &request_id, None),
        Err(e) => dialect.error(ClientError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("internal error: {e}"),
        )),
    }
}

/// Aborts the routing task when the response (or the handler waiting for its first byte)
/// is dropped: a client that leaves stops the upstream generation.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// HTTP 499 (nginx's "client closed request"), for metering abandoned streams.
fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

async fn stream_completion(admitted: Admitted, chat: ChatRequest, dialect: Dialect) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let relay = Relay::new(tx);
    let route = admitted.route.clone();
    let captured = route.capture.is_some().then(|| chat.clone());
    let estimated_input = chat.estimated_input_tokens();
    let routing = tokio::spawn(relay.clone().scope(async move { route.router.send(&chat).await }));
    let abort = AbortOnDrop(routing.abort_handle());
    let (request_id, created, alias) = (admitted.request_id.clone(), admitted.created, admitted.route.alias.clone());
    let finisher_relay = relay.clone();
    tokio::spawn(async move {
        let relay = finisher_relay;
        let joined = routing.await;
        let attempts = relay.take_attempts();
        let route = admitted.route.clone();
        let (outcome, status) = match joined {
            Ok(Ok(routed)) => {
                if let Some(chat) = &captured {
                    admitted.capture(chat, &routed.response, &routed.target);
                }
                (Ok(routed.response), StatusCode::OK)
            }
            Ok(Err(failure)) => {
                let error = route_error(&route, &failure.error);
                let status = if relay.is_committed() { StatusCode::BAD_GATEWAY } else { error.status };
                (Err(error), status)
            }
            Err(_) => {
                let status =
                    if relay.is_committed() && relay.failed() { StatusCode::BAD_GATEWAY } else { client_closed() };
                let e = ClientError::new(status, "server_error", "the request was abandoned");
                (Err(e), status)
            }
        };
        admitted.finish(attempts, status);
        relay.send(RelayItem::Finished(outcome));
    });

    let mut queue = std::collections::VecDeque::new();
    let target = match rx.recv().await {
        Some(RelayItem::Start { target }) => Some(target),
        Some(RelayItem::Finished(Err(error))) => {
            // Nothing was sent: a plain HTTP error, as for a non-streaming request.
            return with_tangle_headers(dialect.error(error), &request_id, None);
        }
        Some(RelayItem::Finished(Ok(response))) => {
            // The reply had no text at all: still a well-formed stream.
            queue.push_back(RelayItem::Finished(Ok(response)));
            None
        }
        Some(other) => {
            queue.push_back(other);
            None
        }
        None => {
            return dialect.error(ClientError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "the upstream stream ended unexpectedly",
            ))
        }
    };
    let mut state = SseState {
        rx,
        _abort: abort,
        queue,
        out: std::collections::VecDeque::new(),
        done: false,
        id: request_id.clone(),
        created,
        alias,
        dialect,
    };
    state.preamble(estimated_input);
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.out.pop_front() {
                return Some((Ok::<Event, Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            let item = match s.queue.pop_front() {
                Some(item) => Some(item),
                None => s.rx.recv().await,
            };
            s.push(item);
        }
    });
    let response = Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    with_tangle_headers(response, &request_id, target.as_deref())
}

/// The response body of a stream: relay items in, SSE events of the client's dialect out.
struct SseState {
    rx: mpsc::UnboundedReceiver<RelayItem>,
    _abort: AbortOnDrop,
    /// Items received before the body started.
    queue: std::collections::VecDeque<RelayItem>,
    /// Events ready to send.
    out: std::collections::VecDeque<Event>,
    done: bool,
    id: String,
    created: u64,
    alias: String,
    dialect: Dialect,
}

impl SseState {
    fn data(&mut self, data: String) {
        self.out.push_back(Event::default().data(data));
    }

    fn named(&mut self, name: &str, data: serde_json::Value) {
        self.out.push_back(Event::default().event(name).data(data.to_string()));
    }

    /// What precedes the first text: OpenAI's role chunk; Anthropic's message and block starts.
    fn preamble(&mut self, estimated_input: u64) {
        match self.dialect {
            Dialect::OpenAi { .. } => {
                let role = json!({"role": "assistant", "content": ""});
                let chunk = protocol::chunk_json(&self.id, self.created, &self.alias, role, None);
                self.data(chunk);
            }
            Dialect::Anthropic => {
                let message = json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.alias, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    // The upstream's own count arrives only at the end (see message_delta).
                    "usage": {"input_tokens": estimated_input, "output_tokens": 0}}});
                self.named("message_start", message);
                let block = json!({"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}});
                self.named("content_block_start", block);
            }
        }
    }

    fn error_event(&mut self, error: ClientError) {
        match self.dialect {
            Dialect::OpenAi { .. } => self.data(error.body().to_string()),
            Dialect::Anthropic => self.named("error", wire::anthropic_error(&error)),
        }
        self.done = true;
    }

    fn push(&mut self, item: Option<RelayItem>) {
        match item {
            Some(RelayItem::Start { .. }) => {}
            Some(RelayItem::Delta(text)) => match self.dialect {
                Dialect::OpenAi { .. } => {
                    let chunk =
                        protocol::chunk_json(&self.id, self.created, &self.alias, json!({"content": text}), None);
                    self.data(chunk);
                }
                Dialect::Anthropic => self.named(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
                ),
            },
            Some(RelayItem::Failed(error)) => self.error_event(ClientError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!(
                    "the upstream failed after the reply had started ({error}); the partial reply above is \
                     incomplete and was not retried elsewhere, to avoid mixing two answers"
                ),
            )),
            // The text already went out as deltas (a reply with none is empty).
            Some(RelayItem::Finished(Ok(response))) => {
                match self.dialect {
                    Dialect::OpenAi { include_usage } => {
                        let finish = wire::finish_reason(response.finish_reason.as_deref()).to_string();
                        let chunk = protocol::chunk_json(&self.id, self.created, &self.alias, json!({}), Some(&finish));
                        self.data(chunk);
                        if include_usage {
                            self.data(wire::usage_chunk(&self.id, self.created, &self.alias, response.usage));
                        }
                        self.data("[DONE]".into());
                    }
                    Dialect::Anthropic => {
                        self.named("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
                        let stop = wire::stop_reason(response.finish_reason.as_deref()).to_string();
                        self.named(
                            "message_delta",
                            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                                   "usage": {"input_tokens": response.usage.input_tokens,
                                             "output_tokens": response.usage.output_tokens}}),
                        );
                        self.named("message_stop", json!({"type": "message_stop"}));
                    }
                }
                self.done = true;
            }
            Some(RelayItem::Finished(Err(error))) => self.error_event(error),
            None => self.error_event(ClientError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "the proxy lost the upstream stream",
            )),
        }
    }
}

async fn list_models(State(proxy): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    let live = proxy.live();
    match authenticate(&live, &headers) {
        Ok(key) => Json(wire::models(allowed_aliases(&live, &key))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(State(proxy): State<Arc<Proxy>>) -> Response {
    let live = proxy.live();
    let now = clock_now();
    let mut health = Vec::new();
    for route in live.routes.values() {
        for t in route.router.status() {
            let healthy = matches!(t.state, crate::router::HealthState::Healthy);
            let labels = format!("route=\"{}\",target=\"{}\"", metrics::escape(&route.alias), metrics::escape(&t.name));
            health.push((labels, if healthy { 1.0 } else { 0.0 }));
        }
    }
    let breakers: Vec<(String, f64)> = proxy
        .board
        .views()
        .into_iter()
        .map(|b| (format!("breaker=\"{}\"", metrics::escape(&b.id)), if b.state == "tripped" { 1.0 } else { 0.0 }))
        .collect();
    let uptime = vec![(String::new(), now.saturating_duration_since(proxy.started_at).as_secs_f64())];
    let text = proxy.metrics.render(&[
        ("tangle_proxy_target_healthy", "1 when the target is healthy, 0 when cooling down or probing.", health),
        ("tangle_proxy_breaker_tripped", "1 when the breaker is tripped and refusing requests.", breakers),
        ("tangle_proxy_uptime_seconds", "Seconds since the proxy started.", uptime),
    ]);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

// ---- admin ----

/// Dashboard and admin routes answer loopback peers only; mutations also need the
/// `x-tangle-admin` header, which a cross-site form or image cannot send.
async fn loopback_only(ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request, next: Next) -> Response {
    if !peer.ip().is_loopback() {
        return ClientError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "the dashboard and admin API answer only on loopback; use an SSH tunnel to reach them",
        )
        .into_response();
    }
    if request.method() == axum::http::Method::POST && request.headers().get("x-tangle-admin").is_none() {
        return ClientError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "admin requests need the header `x-tangle-admin: 1`",
        )
        .into_response();
    }
    next.run(request).await
}

async fn list_breakers(State(proxy): State<Arc<Proxy>>) -> Response {
    Json(json!({"breakers": proxy.breakers()})).into_response()
}

fn board_error(e: BoardError) -> Response {
    let status = match e {
        BoardError::Unknown(_) => StatusCode::NOT_FOUND,
        BoardError::NotTripped(_) => StatusCode::CONFLICT,
    };
    ClientError::new(status, "invalid_request_error", e.to_string()).into_response()
}

async fn confirm_breaker(State(proxy): State<Arc<Proxy>>, UrlPath(id): UrlPath<String>) -> Response {
    match proxy.confirm(&id) {
        Ok(trip) => Json(json!({"confirmed": id, "reason": trip.reason, "message": trip.message})).into_response(),
        Err(e) => board_error(e),
    }
}

async fn reset_breaker(State(proxy): State<Arc<Proxy>>, UrlPath(id): UrlPath<String>) -> Response {
    match proxy.reset(&id) {
        Ok(()) => Json(json!({"reset": id})).into_response(),
        Err(e) => board_error(e),
    }
}
