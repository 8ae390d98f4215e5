//! Log timestamps as controller-runtime's `--zap-time-encoding` writes them (UTC):
//!
//! | encoding | example |
//! |---|---|
//! | `epoch` | `1767225600.123456` (seconds) |
//! | `millis` | `1767225600123.456` |
//! | `nano` | `1767225600123456789` |
//! | `iso8601` | `2026-01-01T00:00:00.123Z` |
//! | `rfc3339` | `2026-01-01T00:00:00Z` |
//! | `rfc3339nano` | `2026-01-01T00:00:00.123456789Z` |

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use llmsched_epp::TimeEncoding;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// A `tracing-subscriber` timer writing [`TimeEncoding`].
#[derive(Debug, Clone, Copy)]
pub struct ZapTime(pub TimeEncoding);

impl FormatTime for ZapTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        w.write_str(&format(self.0, now.as_secs(), now.subsec_nanos()))
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Formats `secs.nanos` since the epoch.
pub fn format(enc: TimeEncoding, secs: u64, nanos: u32) -> String {
    let mut s = String::with_capacity(32);
    let date = |s: &mut String| {
        let days = i64::try_from(secs / 86_400).unwrap_or(0);
        let rem = secs % 86_400;
        let (y, mo, d) = civil_from_days(days);
        let _ = write!(
            s,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
    };
    match enc {
        TimeEncoding::Epoch => {
            let _ = write!(s, "{secs}.{:06}", nanos / 1000);
        }
        TimeEncoding::Millis => {
            let _ = write!(
                s,
                "{}.{:03}",
                secs * 1000 + u64::from(nanos / 1_000_000),
                nanos % 1_000_000 / 1000
            );
        }
        TimeEncoding::Nano => {
            let _ = write!(
                s,
                "{}",
                u128::from(secs) * 1_000_000_000 + u128::from(nanos)
            );
        }
        TimeEncoding::Iso8601 => {
            date(&mut s);
            let _ = write!(s, ".{:03}Z", nanos / 1_000_000);
        }
        TimeEncoding::Rfc3339 => {
            date(&mut s);
            s.push('Z');
        }
        TimeEncoding::Rfc3339Nano => {
            date(&mut s);
            let _ = write!(s, ".{nanos:09}Z");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding() {
        // 2026-01-01T00:00:00Z plus 123456789 ns.
        let (secs, nanos) = (1_767_225_600, 123_456_789);
        assert_eq!(
            format(TimeEncoding::Epoch, secs, nanos),
            "1767225600.123456"
        );
        assert_eq!(
            format(TimeEncoding::Millis, secs, nanos),
            "1767225600123.456"
        );
        assert_eq!(
            format(TimeEncoding::Nano, secs, nanos),
            "1767225600123456789"
        );
        assert_eq!(
            format(TimeEncoding::Iso8601, secs, nanos),
            "2026-01-01T00:00:00.123Z"
        );
        assert_eq!(
            format(TimeEncoding::Rfc3339, secs, nanos),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            format(TimeEncoding::Rfc3339Nano, secs, nanos),
            "2026-01-01T00:00:00.123456789Z"
        );
        // A leap day and the last second of a year.
        assert_eq!(
            format(TimeEncoding::Rfc3339, 951_782_400, 0),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            format(TimeEncoding::Rfc3339, 1_767_225_599, 0),
            "2025-12-31T23:59:59Z"
        );
        assert_eq!(format(TimeEncoding::Rfc3339, 0, 0), "1970-01-01T00:00:00Z");
    }
}
