//! Client keys, budgets and circuit breakers through the whole proxy: auth and route scopes,
//! budget exhaustion, the 10-hour continuous-spend rule under tokio's paused clock (hours
//! pass in milliseconds), trip → alert on a test webhook → confirm/reset over the admin
//! API, trips surviving a restart, target breakers failing over, and no secret anywhere.

use crate::proxy_common as common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tangle::ledger::GroupBy;
use tangle::mock::{Fault, MockConfig, MockServer};

fn two_routes(mock: &MockServer, key_extra: &str, webhook: &str) -> String {
    format!(
        "state_dir: STATE_DIR
routes:
  support:
    targets:
      - {{ name: main, provider: openai_compatible, model: m, base_url: '{base}', api_key: '${{UPSTREAM_KEY}}',
           pricing: {{ input_per_mtok: 1000, output_per_mtok: 2000 }} }}
  internal:
    targets:
      - {{ name: other, provider: anthropic, model: c, base_url: '{anthropic}', api_key: '${{UPSTREAM_KEY}}' }}
keys:
  - {{ name: app, key: '${{APP_KEY}}', routes: [support]{key_extra} }}
  - {{ name: ops, key: '${{OPS_KEY}}' }}
router: {{ backoff_initial: 1ms, backoff_max: 5ms }}
alerts: {{ webhook: '{webhook}' }}
",
        base = mock.openai_base_url(),
        anthropic = mock.anthropic_base_url(),
    )
}

#[tokio::test]
async fn keys_authenticate_and_are_scoped_to_their_routes() {
    let mock = mock().await;
    let hook = Webhook::start().await;
    let proxy = TestProxy::start(&two_routes(&mock, "", &hook.url)).await;
    let url = &proxy.url;

    let none = send(url, None, &chat_body("support", "q", false)).await;
    assert_eq!((none.status, none.json["error"]["code"].as_str()), (401, Some("missing_api_key")), "{none:?}");
    let wrong = chat(url, "not-a-key", "support", "q", false).await;
    assert_eq!((wrong.status, wrong.json["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    assert!(!wrong.json.to_string().contains("not-a-key"), "a presented key is never echoed");

    let ok = chat(url, APP_KEY, "support", "q", false).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // Anthropic-style clients send `x-api-key`.
    let via_header = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-api-key", OPS_KEY)
        .json(&chat_body("internal", "q", false))
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), 200);

    let forbidden = chat(url, APP_KEY, "internal", "q", false).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.json["error"]["code"], "model_not_allowed");
    assert!(forbidden.json["error"]["message"].as_str().unwrap().contains("it may use: support"));
    let unknown = chat(url, OPS_KEY, "gpt-9", "q", true).await;
    assert_eq!((unknown.status, unknown.json["error"]["code"].as_str()), (404, Some("model_not_found")));

    let models = |key: &'static str| {
        let url = url.clone();
        async move {
            let v: Value =
                client().get(format!("{url}/v1/models")).bearer_auth(key).send().await.unwrap().json().await.unwrap();
            v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(models(APP_KEY).await, vec!["support"]);
    assert_eq!(models(OPS_KEY).await, vec!["internal", "support"]);
    assert_eq!(mock.counts().total, 2, "refused requests never reach an upstream");

    let by_key = ledger_totals(&proxy.state_dir(), GroupBy::ApiKey, 2).await;
    let keys: Vec<(&str, u64)> = by_key.iter().map(|t| (t.key.as_str(), t.calls)).collect();
    assert!(keys.contains(&("app", 1)) && keys.contains(&("ops", 1)), "{keys:?}");
    let by_route = ledger_totals(&proxy.state_dir(), GroupBy::Stage, 2).await;
    assert!(by_route.iter().any(|t| t.key == "internal" && t.calls == 1), "{by_route:?}");
    assert!(hook.received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn budget_exhaustion_stops_the_key_before_spending_alerts_and_resumes_on_confirm() {
    let mock = mock().await;
    let hook = Webhook::start().await;
    let proxy = TestProxy::start(&two_routes(&mock, ", budget: { max_tokens: 60 }", &hook.url)).await;
    let url = &proxy.url;
    let mut served = 0;
    let refused = loop {
        let answer = chat(url, APP_KEY, "support", "hello there", false).await;
        if answer.status != 200 {
            break answer;
        }
        served += 1;
        assert!(served < 50, "the budget never stopped the key");
    };
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.json["error"]["code"], "breaker_open");
    assert_eq!(refused.retry.as_deref(), Some("false"), "x-should-retry: false, retrying cannot help");
    let message = refused.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("`key:app`") && message.contains("token budget"), "{message}");
    assert!(message.contains("tangle breaker confirm key:app"), "{message}");
    assert_eq!(mock.counts().total, served, "the refused request cost nothing upstream");
    // Spent never passes the budget: reservations stop it first.
    let spent = ledger_totals(&proxy.state_dir(), GroupBy::ApiKey, served).await;
    let app = spent.iter().find(|t| t.key == "app").unwrap();
    assert!(app.input_tokens + app.output_tokens <= 60, "{app:?}");

    let alerts = hook.wait_for(1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["event"], "breaker_tripped");
    assert_eq!(alerts[0]["breaker"], "key:app");
    assert_eq!(alerts[0]["reason"], "total_budget");

    // Other keys are unaffected; the tripped key stays refused.
    assert_eq!(chat(url, OPS_KEY, "support", "q", false).await.status, 200);
    assert_eq!(chat(url, APP_KEY, "support", "q", true).await.status, 429);
    assert_eq!(breaker_state(url, "key:app").await, "tripped");

    // Admin mutations need the header a cross-site form cannot send.
    let bare = client().post(format!("{url}/admin/breakers/key:app/confirm")).send().await.unwrap();
    assert_eq!(bare.status(), 403);
    assert_eq!(admin(url, "/admin/breakers/key:nobody/confirm").await.0, 404);
    assert_eq!(admin(url, "/admin/breakers/key:ops/confirm").await.0, 409, "not tripped");
    let (status, body) = admin(url, "/admin/breakers/key%3Aapp/confirm").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reason"], "total_budget");
    assert_eq!(breaker_state(url, "key:app").await, "closed");
    let again = chat(url, APP_KEY, "support", "hello there", true).await;
    assert_eq!(again.status, 200, "a fresh budget after confirm");
    let alerts = hook.wait_for(2).await;
    assert_eq!(alerts[1]["event"], "breaker_confirmed");
}

/// One request, then `step` of simulated time with the clock paused (no I/O in flight).
async fn request_then_advance(url: &str, step: Duration) -> u16 {
    let status = chat(url, APP_KEY, "support", "are you there", false).await.status;
    tokio::time::pause();
    tokio::time::advance(step).await;
    tokio::time::resume();
    status
}

#[tokio::test]
async fn ten_hours_of_continuous_spend_trip_the_key_in_simulated_time() {
    let mock = mock().await;
    let hook = Webhook::start().await;
    let extra = ", breaker: { max_continuous: 10h, idle_reset: 5m }";
    let proxy = TestProxy::start(&two_routes(&mock, extra, &hook.url)).await;
    let url = &proxy.url;
    let minute = Duration::from_secs(60);

    // Nine hours of a request every 4 minutes, then a 6-minute pause: the streak ends.
    for i in 0..135 {
        assert_eq!(request_then_advance(url, 4 * minute).await, 200, "request {i}");
    }
    tokio::time::pause();
    tokio::time::advance(2 * minute).await; // 4 + 2 = a 6-minute gap
    tokio::time::resume();
    let streak_before: f64 =
        breakers(url).await.iter().find(|b| b["id"] == "key:app").unwrap()["streak_s"].as_f64().unwrap();
    assert_eq!(streak_before, 0.0, "a gap over idle_reset ends the streak");

    // Now 10 hours again: the streak crosses the limit on the request at +10h.
    let mut statuses = Vec::new();
    for _ in 0..160 {
        let status = request_then_advance(url, 4 * minute).await;
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(statuses.last(), Some(&429), "never tripped: {statuses:?}");
    assert_eq!(served, 151, "requests at 0, 4m, …, 10h are served; the one at 10h 4m is refused");

    let alerts = hook.wait_for(1).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["reason"], "continuous_spend");
    let text = alerts[0]["message"].as_str().unwrap();
    assert!(text.contains("continuously for 10h") && text.contains("limit 10h"), "{text}");
    let state: Value = client().get(format!("{url}/dashboard/state")).send().await.unwrap().json().await.unwrap();
    let row = state["keys"].as_array().unwrap().iter().find(|k| k["name"] == "app").unwrap();
    assert_eq!(row["breaker"], "tripped", "{state}");

    // The operator confirms: the streak restarts, the key works at once.
    assert_eq!(admin(url, "/admin/breakers/key:app/confirm").await.0, 200);
    assert_eq!(request_then_advance(url, 4 * minute).await, 200);
    assert_eq!(request_then_advance(url, 4 * minute).await, 200);
    assert_eq!(breaker_state(url, "key:app").await, "closed");
}

#[tokio::test]
async fn a_trip_survives_a_restart_and_reset_zeroes_the_counters() {
    let mock = mock().await;
    let hook = Webhook::start().await;
    let extra = ", breaker: { max_continuous: off, max_tokens_per_hour: 20 }";
    let yaml = two_routes(&mock, extra, &hook.url);
    let proxy = TestProxy::start(&yaml).await;
    let mut served = 0;
    while chat(&proxy.url, APP_KEY, "support", "q", false).await.status == 200 {
        served += 1;
        assert!(served < 20);
    }
    assert!(served >= 2, "{served}");
    assert_eq!(hook.wait_for(1).await[0]["reason"], "tokens_per_hour");
    let saved = std::fs::read_to_string(proxy.state_dir().join("proxy-breakers.json")).unwrap();
    assert!(saved.contains("tokens_per_hour"), "{saved}");

    // A restart on the same state keeps the key stopped.
    let dir = proxy.stop().await;
    let proxy = TestProxy::start_in(&yaml, dir).await;
    let refused = chat(&proxy.url, APP_KEY, "support", "q", false).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("in the last hour"));

    // Reset (unlike confirm, allowed in any state) zeroes the hour window.
    assert_eq!(admin(&proxy.url, "/admin/breakers/key:app/reset").await.0, 200);
    let b = breakers(&proxy.url).await.into_iter().find(|b| b["id"] == "key:app").unwrap();
    assert_eq!((b["state"].as_str(), b["last_hour_tokens"].as_u64()), (Some("closed"), Some(0)), "{b}");
    assert_eq!(chat(&proxy.url, APP_KEY, "support", "q", false).await.status, 200);
    let alerts = hook.wait_for(2).await;
    assert_eq!(alerts.last().unwrap()["event"], "breaker_reset");
}

#[tokio::test]
async fn a_route_budget_stops_every_key_and_a_target_breaker_fails_over() {
    let (dear, cheap) = (mock().await, mock().await);
    let hook = Webhook::start().await;
    let yaml = format!(
        "state_dir: STATE_DIR
routes:
  support:
    targets:
      - {{ name: dear, provider: openai_compatible, model: d, base_url: '{}', api_key: '${{UPSTREAM_KEY}}',
           pricing: {{ input_per_mtok: 1000000, output_per_mtok: 1000000 }} }}
      - {{ name: cheap, provider: openai_compatible, model: c, base_url: '{}', api_key: '${{UPSTREAM_KEY}}' }}
    budget: {{ max_tokens: 200 }}
keys:
  - {{ name: app, key: '${{APP_KEY}}' }}
  - {{ name: ops, key: '${{OPS_KEY}}' }}
target_breakers:
  dear: {{ breaker: {{ max_cost_per_hour: 10 }} }}
router: {{ backoff_initial: 1ms, failure_threshold: 100 }}
alerts: {{ webhook: '{}' }}
",
        dear.openai_base_url(),
        cheap.openai_base_url(),
        hook.url
    );
    let proxy = TestProxy::start(&yaml).await;
    let url = &proxy.url;
    // ~6 tokens per call at $1 a token: the dear target trips its $10/hour breaker on the
    // second call, and traffic moves to the cheap one without the client noticing.
    let first = chat(url, APP_KEY, "support", "q", false).await;
    assert_eq!(first.target.as_deref(), Some("dear"));
    let second = chat(url, APP_KEY, "support", "q", false).await;
    assert_eq!(second.target.as_deref(), Some("dear"));
    let third = chat(url, OPS_KEY, "support", "q", true).await;
    assert_eq!((third.status, third.target.as_deref()), (200, Some("cheap")), "{third:?}");
    assert_eq!(dear.counts().total, 2, "a tripped target is not called");
    assert_eq!(hook.wait_for(1).await[0]["breaker"], "target:dear");
    let statuses: Vec<String> = {
        let _ = ledger_totals(&proxy.state_dir(), GroupBy::Target, 4).await;
        let conn = rusqlite::Connection::open(proxy.state_dir().join("ledger.sqlite")).unwrap();
        let mut stmt = conn.prepare("SELECT status FROM calls ORDER BY id").unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(statuses, vec!["ok", "ok", "breaker_open", "ok"]);

    // The route's token budget (200) then stops both keys.
    let mut refused = None;
    for _ in 0..60 {
        let a = chat(url, APP_KEY, "support", "q", false).await;
        if a.status != 200 {
            refused = Some(a);
            break;
        }
    }
    let refused = refused.expect("the route budget stopped it");
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("`route:support`"), "{refused:?}");
    assert_eq!(chat(url, OPS_KEY, "support", "q", false).await.status, 429, "a route breaker stops every key");
    // Confirming the target lets the dear target serve again once the route is open.
    assert_eq!(admin(url, "/admin/breakers/route:support/confirm").await.0, 200);
    assert_eq!(admin(url, "/admin/breakers/target:dear/confirm").await.0, 200);
    assert_eq!(chat(url, OPS_KEY, "support", "q", false).await.target.as_deref(), Some("dear"));
}

#[tokio::test]
async fn no_secret_reaches_a_client_the_ledger_the_dashboard_metrics_or_state_files() {
    // This upstream expects another key and echoes the one it got, as real APIs do.
    let echoing =
        MockServer::start(MockConfig { expected_api_key: Some("the-right-key".into()), ..Default::default() })
            .await
            .unwrap();
    let good = mock().await;
    let hook = Webhook::start().await;
    let yaml = format!(
        "state_dir: STATE_DIR
routes:
  support:
    targets:
      - {{ name: echo, provider: openai_compatible, model: e, base_url: '{}', api_key: '${{UPSTREAM_KEY}}' }}
  broken:
    targets:
      - {{ name: echo2, provider: anthropic, model: e, base_url: '{}', api_key: '${{UPSTREAM_KEY}}', max_retries: 0 }}
      - {{ name: good, provider: openai_compatible, model: g, base_url: '{}', api_key: '${{UPSTREAM_KEY}}' }}
keys:
  - {{ name: app, key: '${{APP_KEY}}', budget: {{ max_tokens: 40 }} }}
alerts: {{ webhook: '{}' }}
",
        echoing.openai_base_url(),
        echoing.anthropic_base_url(),
        good.openai_base_url(),
        hook.url
    );
    let proxy = TestProxy::start(&yaml).await;
    let url = &proxy.url;
    let mut bodies = Vec::new();
    for stream in [false, true] {
        let a = chat(url, APP_KEY, "support", "q", stream).await;
        assert_eq!(a.status, 502, "{a:?}");
        let message = a.json["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("Incorrect API key provided: ***"), "redacted, not dropped: {message}");
        bodies.push(a.json.to_string());
        let b = chat(url, APP_KEY, "broken", "q", stream).await;
        bodies.push(format!("{} {}", b.json, b.events.join("\n")));
    }
    while chat(url, APP_KEY, "broken", "q", false).await.status == 200 {}
    let _ = hook.wait_for(1).await;
    assert!(echoing.counts().total >= 2, "the echoing upstream was called");
    for path in ["/metrics", "/dashboard/state", "/admin/breakers", "/dashboard", "/v1/models"] {
        let text =
            client().get(format!("{url}{path}")).bearer_auth(APP_KEY).send().await.unwrap().text().await.unwrap();
        bodies.push(text);
    }
    bodies.extend(hook.received.lock().unwrap().iter().map(Value::to_string));
    for body in &bodies {
        assert!(!body.contains(UPSTREAM_KEY), "upstream key leaked: {body}");
        assert!(!body.contains(APP_KEY), "client key leaked: {body}");
    }
    let dir = proxy.stop().await;
    assert_not_in_files(dir.path(), UPSTREAM_KEY);
    assert_not_in_files(dir.path(), APP_KEY);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_health() {
    let mock = mock().await;
    let hook = Webhook::start().await;
    let proxy = TestProxy::start(&two_routes(&mock, "", &hook.url)).await;
    chat(&proxy.url, APP_KEY, "support", "q", false).await;
    chat(&proxy.url, APP_KEY, "support", "q", true).await;
    chat(&proxy.url, "bad-key-bad-key-bad", "support", "q", true).await;
    mock.push_faults([Fault::ServerError]);
    chat(&proxy.url, OPS_KEY, "internal", "q", false).await;
    let text = client().get(format!("{}/metrics", proxy.url)).send().await.unwrap().text().await.unwrap();
    for expected in [
        "tangle_proxy_responses_total{route=\"support\",key=\"app\",status=\"200\"} 2",
        "tangle_proxy_responses_total{route=\"-\",key=\"-\",status=\"401\"} 1",
        "tangle_proxy_responses_total{route=\"internal\",key=\"ops\",status=\"200\"} 1",
        "tangle_proxy_upstream_attempts_total{target=\"other\",outcome=\"failed\"} 1",
        "tangle_proxy_target_healthy{route=\"support\",target=\"main\"} 1",
        "tangle_proxy_breaker_tripped{breaker=\"key:app\"} 0",
        "tangle_proxy_request_duration_seconds_count 4",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in\n{text}");
    }
    let tokens = text.lines().find(|l| l.starts_with("tangle_proxy_tokens_total{key=\"app\",direction=\"output\"}"));
    assert_eq!(tokens, Some("tangle_proxy_tokens_total{key=\"app\",direction=\"output\"} 4"), "2 calls × 2 tokens");
}

/// The dashboard and admin API refuse a peer that is not on loopback (when this machine
/// has a non-loopback address to test from).
#[tokio::test]
async fn the_dashboard_answers_loopback_only() {
    let Some(ip) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        eprintln!("SKIPPED: no non-loopback address on this machine");
        return;
    };
    let mock = mock().await;
    let proxy = TestProxy::start(&two_routes(&mock, "", "http://127.0.0.1:9/hook")).await;
    // TestProxy binds 127.0.0.1; serve the same proxy on all interfaces too.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = proxy.proxy.clone();
    tokio::spawn(async move { tangle::proxy::serve(listener, served, std::future::pending()).await });
    let remote = format!("http://{ip}:{port}");
    let page = client().get(format!("{remote}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 403);
    let admin = client().get(format!("{remote}/admin/breakers")).send().await.unwrap();
    assert_eq!(admin.status(), 403);
    let api = chat(&remote, APP_KEY, "support", "q", false).await;
    assert_eq!(api.status, 200, "the API itself is for everyone who can reach it");
    let local = client().get(format!("http://127.0.0.1:{port}/dashboard")).send().await.unwrap();
    assert_eq!(local.status(), 200);
    assert!(local.text().await.unwrap().contains("<title>tangle proxy</title>"));
}
