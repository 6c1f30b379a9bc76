//! In-memory counters since start-up, for `/metrics` (Prometheus text format) and the
//! dashboard's live rates. The ledger is the durable record; these are cheap to read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::support::lock;

/// Cumulative totals for one key, route or target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub failed: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl Totals {
    fn add(&mut self, ok: bool, input: u64, output: u64, cost: f64) {
        self.requests += 1;
        self.failed += u64::from(!ok);
        self.input_tokens += input;
        self.output_tokens += output;
        self.cost_usd += cost;
    }
}

/// A gauge family for [`Metrics::render`]: name, help, and (labels, value) per series.
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

/// Upper bounds (seconds) of the request-duration histogram.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Inner {
    by_key: BTreeMap<String, Totals>,
    by_route: BTreeMap<String, Totals>,
    by_target: BTreeMap<String, Totals>,
    /// (route, key, HTTP status) → requests answered.
    responses: BTreeMap<(String, String, u16), u64>,
    duration_buckets: [u64; BUCKETS.len()],
    duration_count: u64,
    duration_sum: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// A copy of the totals, for the dashboard.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsSnapshot {
    pub by_key: BTreeMap<String, Totals>,
    pub by_route: BTreeMap<String, Totals>,
    pub by_target: BTreeMap<String, Totals>,
}

impl Metrics {
    /// One client request answered with `status` after `elapsed`, with its total usage.
    #[allow(clippy::too_many_arguments)]
    pub fn request(&self, route: &str, key: &str, status: u16, input: u64, output: u64, cost: f64, elapsed: Duration) {
        let ok = status < 400;
        let mut m = lock(&self.inner);
        m.by_key.entry(key.to_string()).or_default().add(ok, input, output, cost);
        m.by_route.entry(route.to_string()).or_default().add(ok, input, output, cost);
        *m.responses.entry((route.to_string(), key.to_string(), status)).or_insert(0) += 1;
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                m.duration_buckets[i] += 1;
            }
        }
        m.duration_count += 1;
        m.duration_sum += secs;
    }

    /// One upstream attempt.
    pub fn attempt(&self, target: &str, ok: bool, input: u64, output: u64, cost: f64) {
        lock(&self.inner).by_target.entry(target.to_string()).or_default().add(ok, input, output, cost);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = lock(&self.inner);
        MetricsSnapshot { by_key: m.by_key.clone(), by_route: m.by_route.clone(), by_target: m.by_target.clone() }
    }

    /// The Prometheus text exposition, with the caller's gauges (target health, breakers).
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let m = lock(&self.inner);
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut out, "tangle_proxy_responses_total", "counter", "Client requests answered, by HTTP status.");
        for ((route, key, status), n) in &m.responses {
            let _ = writeln!(
                out,
                "tangle_proxy_responses_total{{route=\"{}\",key=\"{}\",status=\"{status}\"}} {n}",
                escape(route),
                escape(key)
            );
        }
        let scopes: [(&str, &BTreeMap<String, Totals>); 3] =
            [("key", &m.by_key), ("route", &m.by_route), ("target", &m.by_target)];
        family(&mut out, "tangle_proxy_tokens_total", "counter", "Tokens metered, by scope and direction.");
        for (scope, map) in scopes {
            for (name, t) in map {
                for (direction, n) in [("input", t.input_tokens), ("output", t.output_tokens)] {
                    let _ = writeln!(
                        out,
                        "tangle_proxy_tokens_total{{{scope}=\"{}\",direction=\"{direction}\"}} {n}",
                        escape(name)
                    );
                }
            }
        }
        family(&mut out, "tangle_proxy_cost_usd_total", "counter", "Cost in USD at the configured pricing.");
        for (scope, map) in scopes {
            for (name, t) in map {
                let _ = writeln!(out, "tangle_proxy_cost_usd_total{{{scope}=\"{}\"}} {}", escape(name), t.cost_usd);
            }
        }
        family(&mut out, "tangle_proxy_upstream_attempts_total", "counter", "Upstream attempts, failed ones included.");
        for (name, t) in &m.by_target {
            let _ = writeln!(
                out,
                "tangle_proxy_upstream_attempts_total{{target=\"{0}\",outcome=\"ok\"}} {1}\n\
                 tangle_proxy_upstream_attempts_total{{target=\"{0}\",outcome=\"failed\"}} {2}",
                escape(name),
                t.requests - t.failed,
                t.failed
            );
        }
        family(&mut out, "tangle_proxy_request_duration_seconds", "histogram", "Time to answer a client request.");
        for (bound, n) in BUCKETS.iter().zip(m.duration_buckets) {
            let _ = writeln!(out, "tangle_proxy_request_duration_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "tangle_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {}", m.duration_count);
        let _ = writeln!(out, "tangle_proxy_request_duration_seconds_sum {}", m.duration_sum);
        let _ = writeln!(out, "tangle_proxy_request_duration_seconds_count {}", m.duration_count);
        for (name, help, values) in gauges {
            family(&mut out, name, "gauge", help);
            for (labels, v) in values {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
        out
    }
}

/// Escapes a label value (backslash, quote, newline) per the exposition format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.request("r", "k\"1", 200, 10, 2, 0.5, Duration::from_millis(3));
        m.request("r", "k\"1", 429, 0, 0, 0.0, Duration::from_millis(30));
        m.attempt("t", true, 10, 2, 0.5);
        let text = m.render(&[("tangle_proxy_target_healthy", "1 when healthy.", vec![("target=\"t\"".into(), 1.0)])]);
        assert!(text.contains("tangle_proxy_responses_total{route=\"r\",key=\"k\\\"1\",status=\"429\"} 1"), "{text}");
        assert!(text.contains("tangle_proxy_tokens_total{key=\"k\\\"1\",direction=\"input\"} 10"), "{text}");
        assert!(text.contains("tangle_proxy_request_duration_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("tangle_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("# TYPE tangle_proxy_target_healthy gauge\ntangle_proxy_target_healthy{target=\"t\"} 1"));
        let s = m.snapshot();
        assert_eq!(s.by_key["k\"1"].failed, 1);
        assert_eq!(s.by_route["r"].requests, 2);
    }
}
