//! The operator's page: target health, live tokens/s and cost per key, route and target,
//! and breakers with confirm/reset buttons. One self-contained HTML document; its script
//! renders JSON snapshots pushed over SSE — every second, and at once on a breaker event —
//! and calls the admin API for the buttons. Everything is rendered with `textContent`, so
//! names and messages cannot inject markup.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::metrics::{MetricsSnapshot, Totals};
use super::Proxy;
use crate::router::HealthState;
use crate::support::clock_now;

type Previous = Option<(Instant, MetricsSnapshot)>;

fn rates(now: &Totals, before: Option<&Totals>, secs: f64) -> Value {
    let before = before.copied().unwrap_or_default();
    let tokens = (now.input_tokens + now.output_tokens).saturating_sub(before.input_tokens + before.output_tokens);
    let cost = (now.cost_usd - before.cost_usd).max(0.0);
    let (tps, cph) = if secs > 0.0 { (tokens as f64 / secs, cost / secs * 3600.0) } else { (0.0, 0.0) };
    json!({
        "requests": now.requests,
        "failed": now.failed,
        "tokens": now.input_tokens + now.output_tokens,
        "cost_usd": now.cost_usd,
        "tokens_per_s": tps,
        "cost_per_hour": cph,
    })
}

/// The dashboard's document, with rates against `previous` (none on the first snapshot).
pub(super) fn snapshot(proxy: &Proxy, previous: &Previous) -> (Value, Previous) {
    let now = clock_now();
    let live = proxy.live();
    let metrics = proxy.metrics.snapshot();
    let (secs, before) = match previous {
        Some((at, m)) => (now.saturating_duration_since(*at).as_secs_f64(), Some(m)),
        None => (0.0, None),
    };
    let breakers = proxy.board.views();
    let state_of = |id: &str| breakers.iter().find(|b| b.id == id).map(|b| b.state.clone());
    let routes: Vec<Value> = live
        .routes
        .values()
        .map(|route| {
            let targets: Vec<Value> = route
                .router
                .status()
                .into_iter()
                .map(|t| {
                    let (state, retry_in) = match t.state {
                        HealthState::Healthy => ("healthy", 0.0),
                        HealthState::CoolingDown { until } => {
                            ("cooling_down", until.saturating_duration_since(now).as_secs_f64())
                        }
                        HealthState::Probing { .. } => ("probing", 0.0),
                    };
                    let totals = metrics.by_target.get(&t.name).copied().unwrap_or_default();
                    json!({
                        "name": t.name,
                        "state": state,
                        "retry_in_s": retry_in,
                        "consecutive_failures": t.consecutive_failures,
                        "breaker": state_of(&format!("target:{}", t.name)),
                        "usage": rates(&totals, before.and_then(|b| b.by_target.get(&t.name)), secs),
                    })
                })
                .collect();
            let totals = metrics.by_route.get(&route.alias).copied().unwrap_or_default();
            json!({
                "alias": route.alias,
                "breaker": route.breaker_id.as_deref().and_then(state_of),
                "usage": rates(&totals, before.and_then(|b| b.by_route.get(&route.alias)), secs),
                "targets": targets,
            })
        })
        .collect();
    let keys: Vec<Value> = live
        .config
        .keys
        .iter()
        .map(|k| {
            let totals = metrics.by_key.get(&k.name).copied().unwrap_or_default();
            json!({
                "name": k.name,
                "breaker": state_of(&format!("key:{}", k.name)),
                "usage": rates(&totals, before.and_then(|b| b.by_key.get(&k.name)), secs),
            })
        })
        .collect();
    let doc = json!({
        "at": crate::timefmt::now_rfc3339(),
        "uptime_s": now.saturating_duration_since(proxy.started_at).as_secs(),
        "routes": routes,
        "keys": keys,
        "breakers": breakers,
    });
    (doc, Some((now, metrics)))
}

pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

pub(super) async fn state(State(proxy): State<Arc<Proxy>>) -> Response {
    Json(snapshot(&proxy, &None).0).into_response()
}

/// A snapshot at once, then one a second, or sooner when a breaker changes.
pub(super) async fn events(State(proxy): State<Arc<Proxy>>) -> Response {
    let changes = proxy.changes.subscribe();
    let closing = proxy.closing.subscribe();
    let start = (proxy, changes, closing, None::<(Instant, super::metrics::MetricsSnapshot)>, true);
    let stream = futures_util::stream::unfold(start, |(proxy, mut changes, mut closing, previous, first)| async move {
        if *closing.borrow() {
            return None;
        }
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                _ = closing.changed() => return None,
            }
        }
        let (doc, previous) = snapshot(&proxy, &previous);
        let event = Event::default().event("snapshot").data(doc.to_string());
        Some((Ok::<Event, Infallible>(event), (proxy, changes, closing, previous, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tangle proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; background: #fafbfc; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
  #status { color: #57606a; }
  table { border-collapse: collapse; min-width: 40rem; background: #fff; }
  th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
  th { background: #f0f3f6; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .healthy, .closed { color: #1a7f37; font-weight: 600; }
  .cooling_down, .probing { color: #9a6700; font-weight: 600; }
  .tripped { color: #cf222e; font-weight: 700; }
  tr.tripped-row { background: #ffebe9; }
  button { font: inherit; padding: .15rem .7rem; cursor: pointer; }
  button.confirm { background: #1f883d; color: #fff; border: 1px solid #1a7f37; border-radius: 4px; }
  #notice { min-height: 1.4em; color: #0969da; }
</style>
</head>
<body>
<h1>tangle proxy</h1>
<div id="status">connecting…</div>
<div id="notice"></div>

<h2>Breakers</h2>
<table id="breakers"><thead><tr>
  <th>breaker</th><th>state</th><th>why</th><th>tripped at</th><th>streak</th>
  <th>last hour</th><th>budget used</th><th></th>
</tr></thead><tbody></tbody></table>

<h2>Targets</h2>
<table id="targets"><thead><tr>
  <th>route</th><th>target</th><th>health</th><th>failures in a row</th><th>attempts</th>
  <th>failed</th><th>tokens/s</th><th>cost/hour</th>
</tr></thead><tbody></tbody></table>

<h2>Keys</h2>
<table id="keys"><thead><tr>
  <th>key</th><th>breaker</th><th>requests</th><th>failed</th><th>tokens</th><th>tokens/s</th>
  <th>cost USD</th><th>cost/hour</th>
</tr></thead><tbody></tbody></table>

<h2>Routes</h2>
<table id="routes"><thead><tr>
  <th>route</th><th>breaker</th><th>requests</th><th>failed</th><th>tokens</th><th>tokens/s</th>
  <th>cost USD</th><th>cost/hour</th>
</tr></thead><tbody></tbody></table>

<script>
"use strict";
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
// Rows whose data did not change are kept as they are, so a button is never replaced
// under the operator's pointer by the next snapshot.
function fill(id, items, build) {
  const body = document.querySelector("#" + id + " tbody");
  const existing = new Map([...body.children].map(tr => [tr.dataset.sig, tr]));
  const rows = items.map(item => {
    const sig = JSON.stringify(item);
    const kept = existing.get(sig);
    if (kept) return kept;
    const tr = document.createElement("tr");
    tr.dataset.sig = sig;
    build(tr, item);
    return tr;
  });
  const unchanged = rows.length === body.children.length && rows.every((r, i) => body.children[i] === r);
  if (!unchanged) body.replaceChildren(...rows);
}
const n = (x, d) => Number(x || 0).toFixed(d);
function duration(s) {
  s = Math.floor(s || 0);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  return h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
}
async function act(id, action) {
  const notice = document.getElementById("notice");
  try {
    const r = await fetch("/admin/breakers/" + encodeURIComponent(id) + "/" + action,
                          { method: "POST", headers: { "x-tangle-admin": "1" } });
    const body = await r.json();
    notice.textContent = r.ok ? (action === "confirm" ? "confirmed " : "reset ") + id
                              : (body.error && body.error.message) || ("HTTP " + r.status);
  } catch (e) {
    notice.textContent = "request failed: " + e;
  }
}
function usageCells(tr, u, withRequests) {
  if (withRequests) { cell(tr, u.requests, "num"); cell(tr, u.failed, "num"); }
  cell(tr, u.tokens, "num"); cell(tr, n(u.tokens_per_s, 1), "num");
  cell(tr, "$" + n(u.cost_usd, 4), "num"); cell(tr, "$" + n(u.cost_per_hour, 2), "num");
}
function render(s) {
  document.getElementById("status").textContent =
    "live · updated " + s.at + " · up " + duration(s.uptime_s);
  fill("breakers", s.breakers, (tr, b) => {
    tr.dataset.breaker = b.id;
    if (b.state === "tripped") tr.className = "tripped-row";
    cell(tr, b.id);
    cell(tr, b.state, b.state).dataset.role = "state";
    cell(tr, b.message || "");
    cell(tr, b.tripped_at_ms ? new Date(b.tripped_at_ms).toISOString() : "");
    cell(tr, duration(b.streak_s), "num");
    cell(tr, b.last_hour_tokens + " tok / $" + n(b.last_hour_cost_usd, 4), "num");
    cell(tr, b.budget_tokens + " tok / $" + n(b.budget_cost_usd, 4), "num");
    const td = cell(tr, "");
    if (b.state === "tripped") {
      const button = document.createElement("button");
      button.className = "confirm";
      button.dataset.confirm = b.id;
      button.textContent = "Confirm";
      button.title = "resume spending for " + b.id;
      button.onclick = () => act(b.id, "confirm");
      td.appendChild(button);
    }
    const reset = document.createElement("button");
    reset.dataset.reset = b.id;
    reset.textContent = "Reset";
    reset.title = "zero every counter of " + b.id;
    reset.onclick = () => { if (confirm("Reset every counter of " + b.id + "?")) act(b.id, "reset"); };
    td.appendChild(document.createTextNode(" "));
    td.appendChild(reset);
  });
  const targets = [];
  for (const r of s.routes) for (const t of r.targets) targets.push([r.alias, t]);
  fill("targets", targets, (tr, [alias, t]) => {
    cell(tr, alias); cell(tr, t.name);
    const state = t.state === "cooling_down" ? "cooling down (" + n(t.retry_in_s, 0) + "s)" : t.state;
    cell(tr, state + (t.breaker === "tripped" ? " · breaker tripped" : ""), t.state);
    cell(tr, t.consecutive_failures, "num");
    cell(tr, t.usage.requests, "num"); cell(tr, t.usage.failed, "num");
    cell(tr, n(t.usage.tokens_per_s, 1), "num"); cell(tr, "$" + n(t.usage.cost_per_hour, 2), "num");
  });
  fill("keys", s.keys, (tr, k) => {
    tr.dataset.key = k.name;
    cell(tr, k.name); cell(tr, k.breaker || "", k.breaker || "");
    usageCells(tr, k.usage, true);
  });
  fill("routes", s.routes, (tr, r) => {
    cell(tr, r.alias); cell(tr, r.breaker || "none", r.breaker || "");
    usageCells(tr, r.usage, true);
  });
}
const source = new EventSource("/dashboard/events");
source.addEventListener("snapshot", e => render(JSON.parse(e.data)));
source.onerror = () => { document.getElementById("status").textContent = "disconnected; retrying…"; };
</script>
</body>
</html>
"##;
