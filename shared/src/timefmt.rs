//! Timestamps: UTC, serialized as RFC 3339, stored as milliseconds where ordering matters.

use time::OffsetDateTime;

pub type Timestamp = OffsetDateTime;

/// The current time in UTC.
pub fn now() -> Timestamp {
    OffsetDateTime::now_utc()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 text of a timestamp.
pub fn rfc3339(t: Timestamp) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
