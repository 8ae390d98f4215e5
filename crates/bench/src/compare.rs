//! Side-by-side comparison of two runs in the seed guide's form:
//! `Metric | A | B | Δ (B - A) | Δ% vs A`.
//!
//! `Δ = B − A` in the row's unit and `Δ% = (B − A) / A × 100`. Each row knows whether higher
//! or lower is better, which the Markdown summary bullets use to say "better" or "worse".

use std::fmt::Write as _;

use crate::metrics::{LifecycleSummary, Stats};

/// Which direction of change is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Larger is better (throughput).
    Higher,
    /// Smaller is better (latency, failures).
    Lower,
}

/// One metric of both runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ComparisonRow {
    /// Row title, with unit.
    pub metric: String,
    /// Value of run A.
    pub a: Option<f64>,
    /// Value of run B.
    pub b: Option<f64>,
    /// Improvement direction.
    pub better: Better,
}

impl ComparisonRow {
    /// `B − A`.
    pub fn delta(&self) -> Option<f64> {
        Some(self.b? - self.a?)
    }

    /// `(B − A) / A × 100` (absent when A is 0).
    pub fn delta_pct(&self) -> Option<f64> {
        let a = self.a?;
        let b = self.b?;
        (a != 0.0).then(|| (b - a) / a * 100.0)
    }

    /// Whether B is better than A (`None` when equal or unknown).
    pub fn b_is_better(&self) -> Option<bool> {
        let d = self.delta()?;
        if d == 0.0 {
            return None;
        }
        Some(match self.better {
            Better::Higher => d > 0.0,
            Better::Lower => d < 0.0,
        })
    }
}

/// A comparison table.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Label of the baseline.
    pub label_a: String,
    /// Label of the candidate.
    pub label_b: String,
    /// Rows in display order.
    pub rows: Vec<ComparisonRow>,
}

fn ms(v: Option<f64>) -> Option<f64> {
    v.map(|x| x * 1e3)
}

fn stat(s: &Option<Stats>, f: impl Fn(&Stats) -> Option<f64>) -> Option<f64> {
    s.as_ref().and_then(f)
}

impl Comparison {
    /// Compares two summaries (whole runs or one stage each).
    pub fn new(label_a: &str, a: &LifecycleSummary, label_b: &str, b: &LifecycleSummary) -> Self {
        type Getter = fn(&LifecycleSummary) -> Option<f64>;
        let defs: [(&str, Better, Getter); 19] = [
            ("Requests/sec", Better::Higher, |s| {
                Some(s.successes.throughput.requests_per_sec)
            }),
            ("Input tokens/sec", Better::Higher, |s| {
                Some(s.successes.throughput.input_tokens_per_sec)
            }),
            ("Output tokens/sec", Better::Higher, |s| {
                Some(s.successes.throughput.output_tokens_per_sec)
            }),
            ("Total tokens/sec", Better::Higher, |s| {
                Some(s.successes.throughput.total_tokens_per_sec)
            }),
            (
                "Approx. gen speed (1/mean time_per_output_token) [tok/s/request]",
                Better::Higher,
                |s| {
                    stat(&s.successes.latency.time_per_output_token, |t| Some(t.mean))
                        .filter(|m| *m > 0.0)
                        .map(|m| 1.0 / m)
                },
            ),
            ("Request latency mean (s)", Better::Lower, |s| {
                stat(&s.successes.latency.request_latency, |t| Some(t.mean))
            }),
            ("Request latency median (s)", Better::Lower, |s| {
                stat(&s.successes.latency.request_latency, Stats::median)
            }),
            ("Request latency p90 (s)", Better::Lower, |s| {
                stat(&s.successes.latency.request_latency, |t| t.percentile(90.0))
            }),
            ("TTFT mean (s)", Better::Lower, |s| {
                stat(&s.successes.latency.time_to_first_token, |t| Some(t.mean))
            }),
            ("TTFT median (s)", Better::Lower, |s| {
                stat(&s.successes.latency.time_to_first_token, Stats::median)
            }),
            ("TTFT p90 (s)", Better::Lower, |s| {
                stat(&s.successes.latency.time_to_first_token, |t| {
                    t.percentile(90.0)
                })
            }),
            ("Time/output token mean (ms)", Better::Lower, |s| {
                ms(stat(&s.successes.latency.time_per_output_token, |t| {
                    Some(t.mean)
                }))
            }),
            ("Time/output token median (ms)", Better::Lower, |s| {
                ms(stat(
                    &s.successes.latency.time_per_output_token,
                    Stats::median,
                ))
            }),
            ("Inter-token latency mean (ms)", Better::Lower, |s| {
                ms(stat(&s.successes.latency.inter_token_latency, |t| {
                    Some(t.mean)
                }))
            }),
            ("Inter-token latency median (ms)", Better::Lower, |s| {
                ms(stat(
                    &s.successes.latency.inter_token_latency,
                    Stats::median,
                ))
            }),
            (
                "Normalized time/output token mean (ms)",
                Better::Lower,
                |s| {
                    ms(stat(
                        &s.successes.latency.normalized_time_per_output_token,
                        |t| Some(t.mean),
                    ))
                },
            ),
            ("Cached prompt tokens (%)", Better::Higher, |s| {
                s.cached_prompt_ratio().map(|r| r * 100.0)
            }),
            ("Successful requests", Better::Higher, |s| {
                Some(s.successes.count as f64)
            }),
            ("Failed requests", Better::Lower, |s| {
                Some(s.failures.count as f64)
            }),
        ];
        let rows = defs
            .iter()
            .map(|(metric, better, get)| ComparisonRow {
                metric: (*metric).to_owned(),
                a: get(a),
                b: get(b),
                better: *better,
            })
            .collect();
        Self {
            label_a: label_a.to_owned(),
            label_b: label_b.to_owned(),
            rows,
        }
    }

    /// The row titled `metric`.
    pub fn row(&self, metric: &str) -> Option<&ComparisonRow> {
        self.rows.iter().find(|r| r.metric == metric)
    }

    fn cells(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let header = vec![
            "Metric".to_owned(),
            self.label_a.clone(),
            self.label_b.clone(),
            format!("Δ ({} - {})", self.label_b, self.label_a),
            format!("Δ% vs {}", self.label_a),
        ];
        let body = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.metric.clone(),
                    fmt_opt(r.a),
                    fmt_opt(r.b),
                    r.delta().map_or_else(|| "n/a".to_owned(), fmt_signed),
                    r.delta_pct()
                        .map_or_else(|| "n/a".to_owned(), |p| format!("{p:+.1}%")),
                ]
            })
            .collect();
        (header, body)
    }

    /// An aligned plain-text table for the terminal.
    pub fn to_text(&self) -> String {
        let (header, body) = self.cells();
        let widths = column_widths(&header, &body);
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                // Left-align the metric name, right-align numbers.
                if i == 0 {
                    let _ = write!(out, "{c:<w$}");
                } else {
                    let _ = write!(out, "{c:>w$}");
                }
            }
            let trimmed = out.trim_end().len();
            out.truncate(trimmed);
            out.push('\n');
        };
        line(&mut out, &header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut out, &rule);
        for row in &body {
            line(&mut out, row);
        }
        out
    }

    /// The seed guide's Markdown table, preceded by its three summary bullets.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let pct = |metric: &str| -> String {
            match self.row(metric) {
                Some(r) => match (r.delta_pct(), r.b_is_better()) {
                    (Some(p), Some(true)) => format!("{p:+.1}% (better)"),
                    (Some(p), Some(false)) => format!("{p:+.1}% (worse)"),
                    (Some(p), None) => format!("{p:+.1}%"),
                    (None, _) => "n/a".to_owned(),
                },
                None => "n/a".to_owned(),
            }
        };
        let _ = writeln!(
            out,
            "- **Throughput**: Requests/sec {} ; Output tokens/sec {}",
            pct("Requests/sec"),
            pct("Output tokens/sec")
        );
        let _ = writeln!(
            out,
            "- **Latency**: TTFT (mean) {} ; E2E request latency (mean) {}",
            pct("TTFT mean (s)"),
            pct("Request latency mean (s)")
        );
        let _ = writeln!(
            out,
            "- **Per-token speed**: Time per output token (mean) {}",
            pct("Time/output token mean (ms)")
        );
        out.push('\n');
        let (header, body) = self.cells();
        let widths = column_widths(&header, &body);
        let line = |out: &mut String, cells: &[String]| {
            out.push('|');
            for (c, w) in cells.iter().zip(&widths) {
                let _ = write!(out, " {c:<w$} |");
            }
            out.push('\n');
        };
        line(&mut out, &header);
        out.push('|');
        for w in &widths {
            let _ = write!(out, ":{}|", "-".repeat(w + 1));
        }
        out.push('\n');
        for row in &body {
            line(&mut out, row);
        }
        out
    }
}

fn column_widths(header: &[String], body: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in body {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    widths
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), fmt_num)
}

fn fmt_signed(v: f64) -> String {
    let s = fmt_num(v);
    if v > 0.0 { format!("+{s}") } else { s }
}

/// Formats like the seed guide: five significant digits below 1,000 (trailing zeros
/// trimmed), two decimals with thousands separators above (none for whole numbers).
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    let abs = v.abs();
    if abs >= 1000.0 {
        // Counts stay integers ("1,800"); rates get two decimals ("38,688.28").
        let s = if v.fract() == 0.0 {
            format!("{abs:.0}")
        } else {
            format!("{abs:.2}")
        };
        let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
        let mut grouped = String::new();
        for (i, ch) in int.chars().enumerate() {
            if i > 0 && (int.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(ch);
        }
        let sign = if v < 0.0 { "-" } else { "" };
        return if frac.is_empty() {
            format!("{sign}{grouped}")
        } else {
            format!("{sign}{grouped}.{frac}")
        };
    }
    // abs is in (0, 1000): log10 is finite and small, so the cast is exact.
    let magnitude = abs.log10().floor() as i32;
    let decimals = usize::try_from((4 - magnitude).clamp(0, 8)).unwrap_or(0);
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_look_like_the_guide() {
        assert_eq!(fmt_num(5.1038), "5.1038");
        assert_eq!(fmt_num(38688.28), "38,688.28");
        assert_eq!(fmt_num(1_234_567.891), "1,234,567.89");
        assert_eq!(fmt_num(-15062.92), "-15,062.92");
        assert_eq!(fmt_num(1800.0), "1,800");
        assert_eq!(fmt_num(107.8712), "107.87");
        assert_eq!(fmt_num(0.357006), "0.35701");
        assert_eq!(fmt_num(0.357), "0.357");
        assert_eq!(fmt_num(4.0), "4");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }

    #[test]
    fn delta_and_direction() {
        let r = ComparisonRow {
            metric: "TTFT mean (s)".into(),
            a: Some(72.9),
            b: Some(2.13),
            better: Better::Lower,
        };
        assert!((r.delta().expect("d") - (2.13 - 72.9)).abs() < 1e-12);
        assert!((r.delta_pct().expect("p") - (2.13 - 72.9) / 72.9 * 100.0).abs() < 1e-12);
        assert_eq!(r.b_is_better(), Some(true));
        let zero = ComparisonRow {
            a: Some(0.0),
            ..r.clone()
        };
        assert_eq!(zero.delta_pct(), None);
        let missing = ComparisonRow { b: None, ..r };
        assert_eq!(missing.delta(), None);
        assert_eq!(missing.b_is_better(), None);
    }
}
