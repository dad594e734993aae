//! Wall-clock readings and the timestamp formats records use.
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Nanoseconds since the epoch (0 if the clock is before it).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// RFC 3339 with microseconds, UTC: the timestamp of kernel events and connection
/// records.
pub fn rfc3339_micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// RFC 3339 with nanoseconds for a time in nanoseconds since the epoch (empty if out
/// of range): audit sessions and exported events.
pub fn rfc3339_nanos(ns: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn known_instants() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(5);
        assert_eq!(super::rfc3339_micros(t), "2023-11-14T22:13:20.000005Z");
        assert_eq!(
            super::rfc3339_nanos(1_700_000_000_000_000_005),
            "2023-11-14T22:13:20.000000005Z"
        );
    }
}
