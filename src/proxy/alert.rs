//! Alerts: a log line on stderr for every breaker event, and a JSON POST to the configured
//! webhook. The body carries `text` too, so a Slack or Mattermost incoming webhook shows it
//! as is. Delivery is retried a few times and never blocks a request.

use std::time::Duration;

use serde_json::{json, Value};

use super::board::BoardEvent;
use crate::timefmt::now_rfc3339;

/// The webhook document for one event.
pub fn payload(event: &BoardEvent, config_file: &str) -> Value {
    let (kind, id, reason, message) = match event {
        BoardEvent::Tripped { id, trip } => ("breaker_tripped", id, Some(trip.reason.as_str()), trip.message.clone()),
        BoardEvent::Confirmed { id, trip } => (
            "breaker_confirmed",
            id,
            Some(trip.reason.as_str()),
            format!("an operator confirmed `{id}`; spending resumes"),
        ),
        BoardEvent::Reset { id } => ("breaker_reset", id, None, format!("an operator reset `{id}`")),
    };
    let (scope, name) = id.split_once(':').unwrap_or(("", id));
    let action = match event {
        BoardEvent::Tripped { .. } => {
            let effect = if scope == "target" {
                "The target is skipped (traffic fails over)"
            } else {
                "Requests are refused with 429"
            };
            format!(
                "{effect} until an operator confirms: `tangle breaker confirm {id} --config {config_file}` or the dashboard"
            )
        }
        _ => String::new(),
    };
    let text = if action.is_empty() {
        format!("tangle proxy: {message}")
    } else {
        format!("tangle proxy: {message}. {action}")
    };
    json!({
        "event": kind,
        "breaker": id,
        "scope": scope,
        "name": name,
        "reason": reason,
        "message": message,
        "action": action,
        "at": now_rfc3339(),
        "text": text,
    })
}

/// The stderr line for one event (no secrets: ids are key *names*).
pub fn log_line(payload: &Value) -> String {
    format!("{} proxy alert: {}", payload["at"].as_str().unwrap_or(""), payload["text"].as_str().unwrap_or(""))
}

/// POSTs `payload` to `url`: up to 3 tries, 5 s each, 1 s then 2 s apart.
pub async fn deliver(client: &reqwest::Client, url: &str, payload: &Value) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
        match client.post(url).timeout(Duration::from_secs(5)).json(payload).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::breaker::{Trip, TripReason};

    #[test]
    fn trip_payload_says_what_why_and_how_to_resume() {
        let trip = Trip { reason: TripReason::CostPerHour, message: "`key:app` spent $2".into(), at_ms: 0 };
        let p = payload(&BoardEvent::Tripped { id: "key:app".into(), trip }, "proxy.yaml");
        assert_eq!(p["event"], "breaker_tripped");
        assert_eq!(p["scope"], "key");
        assert_eq!(p["name"], "app");
        assert_eq!(p["reason"], "cost_per_hour");
        let text = p["text"].as_str().unwrap();
        assert!(text.contains("tangle breaker confirm key:app --config proxy.yaml"), "{text}");
        assert!(log_line(&p).contains("proxy alert: tangle proxy: `key:app` spent $2"));
    }
}
