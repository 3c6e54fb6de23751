//! Bounds on agent-written text. Everything an agent writes (a command agent's summary, the
//! tail of a failed program's output, `text`/`thinking` blocks, tool output) is cut to a
//! fixed number of bytes where it is produced, with a visible marker saying how much was
//! cut, so that every message built from it fits the queue's limit and every stored record
//! the store's (see [`crate::message::MAX_MESSAGE_BYTES`]).
//!
//! Limits are in bytes of UTF-8, not characters: a character is up to 4 bytes, and JSON
//! may write one byte of text as up to 6 (`\u001f`), so a field of `n` bytes takes at most
//! `6 n` bytes in a message.

use serde_json::Value;

/// The most bytes of agent text kept in one field of an outcome (summary, error) or of an
/// event (`text`, `thinking`, a log line).
pub const MAX_AGENT_TEXT_BYTES: usize = 8 * 1024;

/// The most bytes one agent event's `data` takes as JSON before it is replaced by a
/// truncated copy of its text (see [`bound_event_data`]).
pub const MAX_EVENT_DATA_BYTES: usize = 24 * 1024;

/// The longest marker [`truncate_bytes`] appends.
pub const MARKER_MAX_BYTES: usize = 48;

/// `text` cut to at most `max` bytes (on a character boundary), followed by a marker
/// `… [truncated: N more bytes]` when anything was cut. The result is at most
/// `max + MARKER_MAX_BYTES` bytes.
pub fn truncate_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}… [truncated: {} more bytes]",
        &text[..cut],
        text.len() - cut
    )
}

/// Whether `text` carries the marker [`truncate_bytes`] appends.
pub fn is_truncated(text: &str) -> bool {
    text.contains("… [truncated: ")
}

/// An event's data, bounded: unchanged when its JSON takes at most
/// [`MAX_EVENT_DATA_BYTES`], else `{"truncated": <its JSON text, cut>}`.
pub fn bound_event_data(data: Value) -> Value {
    let text = data.to_string();
    if text.len() <= MAX_EVENT_DATA_BYTES {
        return data;
    }
    serde_json::json!({ "truncated": truncate_bytes(&text, MAX_AGENT_TEXT_BYTES) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        assert_eq!(truncate_bytes("abc", 3), "abc");
        assert!(!is_truncated(&truncate_bytes("abc", 3)));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_a_marker() {
        let text = "é".repeat(1000); // 2 bytes each
        let cut = truncate_bytes(&text, 101);
        assert!(cut.starts_with(&"é".repeat(50)));
        assert!(cut.ends_with("… [truncated: 1900 more bytes]"), "{cut}");
        assert!(cut.len() <= 101 + MARKER_MAX_BYTES);
        assert!(is_truncated(&cut));
    }

    #[test]
    fn large_event_data_is_replaced_by_a_bounded_copy() {
        let small = serde_json::json!({ "text": "hello" });
        assert_eq!(bound_event_data(small.clone()), small);
        let big = serde_json::json!({ "text": "\u{1}".repeat(1 << 20) });
        let bounded = bound_event_data(big);
        let text = bounded.to_string();
        assert!(text.len() <= 6 * (MAX_AGENT_TEXT_BYTES + MARKER_MAX_BYTES) + 32);
        assert!(is_truncated(bounded["truncated"].as_str().unwrap()));
    }
}
