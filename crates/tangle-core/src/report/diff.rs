//! `tangle diff A B`: how B differs from A, metric by metric, with the uncertainty of each
//! difference and the examples that flipped.
//!
//! Differences are paired over the examples both reports share (matched by id): the paired
//! bootstrap gives each delta's 95% interval and p-value; right/wrong metrics also get
//! McNemar's exact test, which decides their significance.

use super::{higher_is_better, is_binary_metric, EvalReport};
use crate::eval::stats::{self, Difference, Estimate};
use crate::gate::round;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Whose outputs to compare: `student` (default) or `teacher`.
    pub subject: String,
    /// Significance level for "significant" and `--fail-on-regression`.
    pub alpha: f64,
    pub bootstrap_samples: u32,
    pub seed: u64,
    /// At most this many flipped examples listed per direction and metric.
    pub max_flips: usize,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { subject: "student".into(), alpha: 0.05, bootstrap_samples: 2000, seed: 0, max_flips: 10 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub subject: String,
    pub shared: usize,
    pub only_a: usize,
    pub only_b: usize,
    pub alpha: f64,
    pub metrics: Vec<MetricDiff>,
    pub flips: Vec<Flip>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricDiff {
    pub metric: String,
    /// As reported in each file (over all of its examples).
    pub a: Option<Estimate>,
    pub b: Option<Estimate>,
    /// B − A over the shared examples, when both have per-example values.
    pub paired: Option<Difference>,
    /// McNemar's exact p-value, for right/wrong metrics.
    pub mcnemar_p: Option<f64>,
    pub significant: bool,
    /// Significantly worse in B.
    pub regression: bool,
    pub higher_is_better: bool,
    /// Right/wrong metrics: shared examples right in A and wrong in B, and the reverse.
    pub right_to_wrong: Option<usize>,
    pub wrong_to_right: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flip {
    pub metric: String,
    /// `right_to_wrong` (a regression in B) or `wrong_to_right`.
    pub direction: String,
    pub id: String,
    pub prompt: String,
    pub reference: Option<String>,
    pub a_output: String,
    pub b_output: String,
}

/// Per-example values of `metric` for `subject`: a score, or for `latency_ms` the latency.
fn per_example(report: &EvalReport, subject: &str, metric: &str) -> HashMap<String, f64> {
    report
        .examples
        .iter()
        .filter_map(|e| {
            let v = if metric == "latency_ms" {
                e.latency_ms.get(subject).copied()
            } else {
                e.scores.get(subject).and_then(|s| s.get(metric)).copied()
            };
            v.map(|v| (e.id.clone(), v))
        })
        .collect()
}

pub fn diff(a: &EvalReport, b: &EvalReport, a_name: &str, b_name: &str, options: &DiffOptions) -> Diff {
    let subject = options.subject.as_str();
    let ids_a: BTreeSet<&str> = a.examples.iter().map(|e| e.id.as_str()).collect();
    let ids_b: BTreeSet<&str> = b.examples.iter().map(|e| e.id.as_str()).collect();
    let shared: Vec<&str> = ids_a.intersection(&ids_b).copied().collect();

    let aggregate = |r: &EvalReport| r.subjects.get(subject).map(|s| s.metrics.clone()).unwrap_or_default();
    let (agg_a, agg_b) = (aggregate(a), aggregate(b));
    let mut names: BTreeSet<String> = agg_a.keys().chain(agg_b.keys()).cloned().collect();
    let scored = |r: &EvalReport| -> BTreeSet<String> {
        r.examples.iter().filter_map(|e| e.scores.get(subject)).flat_map(|s| s.keys().cloned()).collect()
    };
    names.extend(scored(a));
    names.extend(scored(b));
    let has_latency = |r: &EvalReport| r.examples.iter().any(|e| e.latency_ms.contains_key(subject));
    if has_latency(a) && has_latency(b) {
        names.insert("latency_ms".into());
    }

    let by_id_a: HashMap<&str, &super::ExampleResult> = a.examples.iter().map(|e| (e.id.as_str(), e)).collect();
    let by_id_b: HashMap<&str, &super::ExampleResult> = b.examples.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut metrics = Vec::new();
    let mut flips = Vec::new();
    for (i, metric) in names.iter().enumerate() {
        let va = per_example(a, subject, metric);
        let vb = per_example(b, subject, metric);
        let pairs: Vec<(&str, f64, f64)> =
            shared.iter().filter_map(|id| Some((*id, *va.get(*id)?, *vb.get(*id)?))).collect();
        let higher = higher_is_better(metric);
        let mut entry = MetricDiff {
            metric: metric.clone(),
            a: agg_a.get(metric).copied().or_else(|| mean_estimate(&va, options)),
            b: agg_b.get(metric).copied().or_else(|| mean_estimate(&vb, options)),
            paired: None,
            mcnemar_p: None,
            significant: false,
            regression: false,
            higher_is_better: higher,
            right_to_wrong: None,
            wrong_to_right: None,
        };
        if !pairs.is_empty() {
            let xs: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let ys: Vec<f64> = pairs.iter().map(|p| p.2).collect();
            let d = stats::paired_bootstrap(&xs, &ys, options.bootstrap_samples, options.seed.wrapping_add(i as u64));
            let mut p = d.p_value;
            if is_binary_metric(metric) {
                let right = |v: f64| v >= 0.5;
                let lost = pairs.iter().filter(|(_, x, y)| right(*x) && !right(*y)).count() as u64;
                let gained = pairs.iter().filter(|(_, x, y)| !right(*x) && right(*y)).count() as u64;
                p = stats::mcnemar_exact(lost, gained);
                entry.mcnemar_p = Some(p);
                entry.right_to_wrong = Some(lost as usize);
                entry.wrong_to_right = Some(gained as usize);
                for (direction, want_a, want_b) in [("right_to_wrong", true, false), ("wrong_to_right", false, true)] {
                    let mut listed = 0;
                    for (id, x, y) in &pairs {
                        if right(*x) == want_a && right(*y) == want_b && listed < options.max_flips {
                            listed += 1;
                            let (ea, eb) = (by_id_a[id], by_id_b[id]);
                            flips.push(Flip {
                                metric: metric.clone(),
                                direction: direction.into(),
                                id: id.to_string(),
                                prompt: ea.prompt.clone(),
                                reference: ea.reference.clone(),
                                a_output: ea.outputs.get(subject).cloned().unwrap_or_default(),
                                b_output: eb.outputs.get(subject).cloned().unwrap_or_default(),
                            });
                        }
                    }
                }
            }
            entry.significant = p < options.alpha && d.delta != 0.0;
            entry.regression = entry.significant && ((d.delta < 0.0) == higher);
            entry.paired = Some(d);
        }
        metrics.push(entry);
    }
    Diff {
        a: a_name.to_string(),
        b: b_name.to_string(),
        subject: subject.to_string(),
        shared: shared.len(),
        only_a: ids_a.len() - shared.len(),
        only_b: ids_b.len() - shared.len(),
        alpha: options.alpha,
        metrics,
        flips,
    }
}

/// The mean of per-example values the report did not aggregate itself (latency).
fn mean_estimate(values: &HashMap<String, f64>, options: &DiffOptions) -> Option<Estimate> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<(&String, f64)> = values.iter().map(|(k, v)| (k, *v)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    let v: Vec<f64> = v.into_iter().map(|(_, x)| x).collect();
    Some(stats::bootstrap_mean(&v, options.bootstrap_samples, options.seed))
}

impl Diff {
    pub fn has_regression(&self) -> bool {
        self.metrics.iter().any(|m| m.regression)
    }

    fn rows(&self) -> Vec<[String; 7]> {
        let cell = |e: &Option<Estimate>| {
            e.map_or_else(|| "—".into(), |e| format!("{} [{}, {}]", round(e.value), round(e.ci_low), round(e.ci_high)))
        };
        let resolution = 1.0 / f64::from(DiffOptions::default().bootstrap_samples);
        self.metrics
            .iter()
            .map(|m| {
                let (delta, ci, p) = match (&m.paired, m.a, m.b) {
                    (Some(d), _, _) => (
                        signed(d.delta),
                        format!("[{}, {}]", signed(d.ci_low), signed(d.ci_high)),
                        match m.mcnemar_p {
                            Some(p) => format!("{} McNemar", p_value(p, 0.0)),
                            None => p_value(d.p_value, resolution),
                        },
                    ),
                    // Aggregate-only values (a p95): the difference, without an interval.
                    (None, Some(a), Some(b)) => (signed(b.value - a.value), "—".into(), "—".into()),
                    _ => ("—".into(), "—".into(), "—".into()),
                };
                let verdict = if m.regression {
                    "worse"
                } else if m.significant {
                    "better"
                } else {
                    ""
                };
                [m.metric.clone(), cell(&m.a), cell(&m.b), delta, ci, p, verdict.to_string()]
            })
            .collect()
    }

    pub fn to_text(&self) -> String {
        let mut out = format!("A: {}\nB: {}\n", self.a, self.b);
        let _ = writeln!(
            out,
            "{}: {} shared examples ({} only in A, {} only in B); Δ = B − A, 95% CI, p; significant at α = {}\n",
            self.subject, self.shared, self.only_a, self.only_b, self.alpha
        );
        let header = ["metric", "A", "B", "Δ", "95% CI of Δ", "p", ""];
        let rows = self.rows();
        let widths: Vec<usize> = (0..7)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0))
            .collect();
        let line = |cells: &[String]| -> String {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(out, "{}", line(&header.map(str::to_string)));
        for r in &rows {
            let _ = writeln!(out, "{}", line(r));
        }
        self.write_flips(&mut out, false);
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("### tangle diff\n\nA: `{}`  \nB: `{}`\n\n", self.a, self.b);
        let _ = writeln!(
            out,
            "{}: {} shared examples ({} only in A, {} only in B). Δ = B − A with its 95% CI and p-value; significant at α = {}.\n",
            self.subject, self.shared, self.only_a, self.only_b, self.alpha
        );
        out.push_str("| metric | A | B | Δ | 95% CI of Δ | p | |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for r in self.rows() {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        self.write_flips(&mut out, true);
        out
    }

    fn write_flips(&self, out: &mut String, markdown: bool) {
        let mut by_metric: BTreeMap<(&str, &str), Vec<&Flip>> = BTreeMap::new();
        for f in &self.flips {
            by_metric.entry((f.metric.as_str(), f.direction.as_str())).or_default().push(f);
        }
        for ((metric, direction), flips) in by_metric {
            let label = if direction == "right_to_wrong" { "right → wrong" } else { "wrong → right" };
            let entry = self.metrics.iter().find(|m| m.metric == metric);
            let total = entry
                .and_then(|m| if direction == "right_to_wrong" { m.right_to_wrong } else { m.wrong_to_right })
                .unwrap_or(flips.len());
            let heading = if markdown { "#### " } else { "" };
            let _ = writeln!(out, "\n{heading}{metric}: {total} {label} (showing {})", flips.len());
            for f in flips {
                let reference =
                    f.reference.as_deref().map(|r| format!(" | reference: {}", quote(r))).unwrap_or_default();
                if markdown {
                    let _ = writeln!(
                        out,
                        "- `{}` {} — A: {} · B: {}{reference}",
                        f.id,
                        quote(&f.prompt),
                        quote(&f.a_output),
                        quote(&f.b_output)
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "  {}  {}\n      A: {}  B: {}{reference}",
                        f.id,
                        quote(&f.prompt),
                        quote(&f.a_output),
                        quote(&f.b_output)
                    );
                }
            }
        }
    }
}

/// A p-value for reading: small ones in scientific notation; one below the bootstrap's
/// resolution as `< resolution`.
fn p_value(p: f64, resolution: f64) -> String {
    if p < resolution {
        format!("<{resolution}")
    } else if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

fn signed(x: f64) -> String {
    if x > 0.0 {
        format!("+{}", round(x))
    } else {
        round(x)
    }
}

/// One line, at most 60 characters, quoted.
fn quote(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let short: String = flat.chars().take(60).collect();
    if short.chars().count() < flat.chars().count() {
        format!("\"{short}…\"")
    } else {
        format!("\"{short}\"")
    }
}
