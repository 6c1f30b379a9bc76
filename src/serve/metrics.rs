//! `/metrics`: the engine's gauges, counters and histograms in Prometheus' text format.

use crate::model::engine::metrics::HistogramSnapshot;
use crate::model::engine::Engine;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, model: &str, value: f64) {
    let _ = writeln!(out, "{name}{{model=\"{}\"}} {value}", crate::proxy::metrics::escape(model));
}

fn histogram(out: &mut String, name: &str, help: &str, model: &str, h: &HistogramSnapshot) {
    family(out, name, "histogram", help);
    let model = crate::proxy::metrics::escape(model);
    for (bound, count) in &h.cumulative {
        let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum_s);
    let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
}

pub fn render(engine: &Engine) -> String {
    let m = engine.metrics();
    let model = engine.info().id.as_str();
    let cache = *crate::support::lock(&m.cache);
    let mut out = String::new();
    let gauges: [(&str, &str, f64); 9] = [
        (
            "tangle_serve_queue_depth",
            "Requests waiting for a place in the running batch.",
            m.queued.load(Ordering::SeqCst) as f64,
        ),
        ("tangle_serve_running_sequences", "Sequences in the running batch.", m.running.load(Ordering::SeqCst) as f64),
        ("tangle_serve_max_running_sequences", "The running batch's bound.", engine.options().max_running as f64),
        (
            "tangle_serve_kv_tokens_running",
            "KV cache cells held by running sequences.",
            m.kv_tokens_running.load(Ordering::SeqCst) as f64,
        ),
        (
            "tangle_serve_kv_tokens_reserved",
            "KV cache cells reserved by running sequences (prompt + max_tokens).",
            m.kv_tokens_reserved.load(Ordering::SeqCst) as f64,
        ),
        ("tangle_serve_kv_tokens_capacity", "KV cache cells in all.", engine.options().kv_tokens as f64),
        (
            "tangle_serve_generated_tokens_per_second",
            "Generated tokens per second over the last ten seconds.",
            m.tokens_per_second(),
        ),
        ("tangle_serve_prefix_cache_entries", "Prompts whose KV the prefix cache keeps.", cache.entries as f64),
        (
            "tangle_serve_prefix_cache_hit_rate",
            "Share of prefix-cache lookups that reused a cached prefix.",
            if cache.lookups == 0 { 0.0 } else { cache.hits as f64 / cache.lookups as f64 },
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        sample(&mut out, name, model, value);
    }
    let counters: [(&str, &str, u64); 8] = [
        ("tangle_serve_requests_total", "Requests accepted.", m.requests_total.load(Ordering::Relaxed)),
        (
            "tangle_serve_rejected_total",
            "Requests refused with 503 (queue full).",
            m.rejected_total.load(Ordering::Relaxed),
        ),
        (
            "tangle_serve_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            m.prompt_tokens_total.load(Ordering::Relaxed),
        ),
        ("tangle_serve_generated_tokens_total", "Tokens generated.", m.generated_tokens_total.load(Ordering::Relaxed)),
        ("tangle_serve_steps_total", "Forward passes run.", m.steps_total.load(Ordering::Relaxed)),
        ("tangle_serve_prefix_cache_lookups_total", "Prefix-cache lookups.", cache.lookups),
        ("tangle_serve_prefix_cache_hits_total", "Prefix-cache lookups that hit.", cache.hits),
        (
            "tangle_serve_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV came from the prefix cache.",
            cache.hit_tokens,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, model, value as f64);
    }
    histogram(
        &mut out,
        "tangle_serve_time_to_first_token_seconds",
        "From acceptance to the first generated token.",
        model,
        &m.ttft.snapshot(),
    );
    histogram(
        &mut out,
        "tangle_serve_request_duration_seconds",
        "From acceptance to the last token.",
        model,
        &m.latency.snapshot(),
    );
    out
}
