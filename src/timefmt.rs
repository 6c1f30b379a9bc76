//! Timestamps in the two forms tangle writes: RFC 3339 in records, compact in run ids.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().replace_nanosecond(0).ok().and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default()
}

/// A run id that sorts by time and stays unique for runs started in the same second:
/// `20261125-061502-3fa9`.
pub fn new_run_id() -> String {
    let now = OffsetDateTime::now_utc();
    let stamp = now.format(format_description!("[year][month][day]-[hour][minute][second]")).unwrap_or_default();
    let salt = (now.nanosecond() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{stamp}-{salt:04x}")
}
