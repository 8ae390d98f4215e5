//! Parsers for the value formats users already write in the reference's flags and configs:
//! Go durations (`50ms`, `1m30s`, `1.5h`) and Kubernetes resource quantities (`100`, `1k`,
//! `500M`, `1Gi`).

use std::time::Duration;

/// A value that does not parse, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{value}': {reason}")]
pub struct UnitError {
    /// `duration` or `quantity`.
    pub what: &'static str,
    /// The input.
    pub value: String,
    /// Why.
    pub reason: String,
}

fn err(what: &'static str, value: &str, reason: impl Into<String>) -> UnitError {
    UnitError {
        what,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses a Go duration: a sequence of decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h` (e.g. `300ms`, `1.5h`, `2h45m`). A bare `0` is zero. Negative durations are
/// rejected (nothing we configure can be negative).
pub fn parse_go_duration(s: &str) -> Result<Duration, UnitError> {
    let input = s.trim();
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    if input.is_empty() {
        return Err(err("duration", s, "empty"));
    }
    if input.starts_with('-') {
        return Err(err("duration", s, "must not be negative"));
    }
    let mut rest = input.strip_prefix('+').unwrap_or(input);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err("duration", s, "expected a number"));
        }
        let num: f64 = rest[..num_len]
            .parse()
            .map_err(|_| err("duration", s, "bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => {
                return Err(err(
                    "duration",
                    s,
                    "missing unit (use ns, us, ms, s, m or h)",
                ));
            }
            other => return Err(err("duration", s, format!("unknown unit '{other}'"))),
        };
        total += num * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|e| err("duration", s, e.to_string()))
}

/// Formats a duration the way Go prints it for common values (`50ms`, `2s`, `1m30s`).
pub fn format_go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let nanos = d.as_nanos();
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_float(nanos as f64 / 1e3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_float(nanos as f64 / 1e6));
    }
    let secs = d.as_secs_f64();
    let h = (secs / 3600.0).floor();
    let m = ((secs - h * 3600.0) / 60.0).floor();
    let s = secs - h * 3600.0 - m * 60.0;
    let mut out = String::new();
    if h > 0.0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0.0 || m > 0.0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_float(s)));
    out
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Parses a Kubernetes quantity into an integer (`1k` = 1000, `1Ki` = 1024, `1.5M`,
/// `500m` = 0.5 rounds up to 1, plain integers). Only non-negative values are accepted.
pub fn parse_quantity(s: &str) -> Result<u64, UnitError> {
    let input = s.trim();
    if input.is_empty() {
        return Err(err("quantity", s, "empty"));
    }
    let split = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(input.len());
    let (num, suffix) = input.split_at(split);
    let value: f64 = num.parse().map_err(|_| err("quantity", s, "bad number"))?;
    if value < 0.0 {
        return Err(err("quantity", s, "must not be negative"));
    }
    let mult: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        other => return Err(err("quantity", s, format!("unknown suffix '{other}'"))),
    };
    let v = (value * mult).ceil();
    if !v.is_finite() || v > u64::MAX as f64 {
        return Err(err("quantity", s, "too large"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("50ms").unwrap(),
            Duration::from_millis(50)
        );
        assert_eq!(parse_go_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("1.5h").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("250us").unwrap(),
            Duration::from_micros(250)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "5x", "-1s", "ms", "1..2s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad} should fail");
        }
        assert!(
            parse_go_duration("5")
                .unwrap_err()
                .to_string()
                .contains("missing unit")
        );
    }

    #[test]
    fn go_duration_format_round_trips() {
        for s in ["50ms", "2s", "1m30s", "5s", "100µs", "1h0m0s"] {
            let d = parse_go_duration(s).unwrap();
            assert_eq!(format_go_duration(d), s);
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100").unwrap(), 100);
        assert_eq!(parse_quantity("1k").unwrap(), 1000);
        assert_eq!(parse_quantity("1Ki").unwrap(), 1024);
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("1.5k").unwrap(), 1500);
        for bad in ["", "1X", "-1", "abc"] {
            assert!(parse_quantity(bad).is_err(), "{bad} should fail");
        }
    }
}
