//! Scrubbing of messages that come from sources before a client sees them.

/// What stands in place of a removed piece of internal authority.
pub const REDACTED: &str = "[redacted]";

/// The most characters of a message a client is shown.
const MAX_MESSAGE_CHARS: usize = 512;

/// Returns `message` with anything that looks like internal authority replaced by
/// `[redacted]`: file paths, URLs, IP addresses (with or without a port) and `host:port`
/// pairs. Long messages are cut to 512 characters.
///
/// Sources should write clean messages in the first place; this is the registry's second
/// line of defence for health messages, diagnostics and error messages.
pub fn sanitize_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, word) in message.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&sanitize_word(word));
    }
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push('…');
    }
    out.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn sanitize_word(word: &str) -> String {
    // Try the word without surrounding punctuation, brackets kept first (for `[::1]:80`),
    // then without brackets too (for `(/some/path)`).
    for edges in ["\"'`(),;.!?", "\"'`()[]{}<>,;.!?"] {
        let is_edge = |c: char| edges.contains(c);
        let start = word.find(|c| !is_edge(c)).unwrap_or(word.len());
        let end = word.rfind(|c| !is_edge(c)).map_or(start, |i| i + 1);
        if start < end && looks_internal(&word[start..end]) {
            return format!("{}{}{}", &word[..start], REDACTED, &word[end..]);
        }
    }
    word.to_string()
}

fn looks_internal(token: &str) -> bool {
    let token = token.trim_end_matches(':');
    if token.contains("://") {
        return true;
    }
    if (token.starts_with('/') && token.len() > 1)
        || token.starts_with("~/")
        || token.starts_with("./")
    {
        return true;
    }
    if token.contains('/') && token.split('/').filter(|s| !s.is_empty()).count() >= 2 {
        return true;
    }
    if token.parse::<std::net::IpAddr>().is_ok() || token.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    // host:port, e.g. `gpu-box.internal:7411`.
    if let Some((host, port)) = token.rsplit_once(':') {
        let host_like = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if host_like && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_urls_and_addresses_are_redacted() {
        let cases = [
            ("cannot open /run/legacy/w1.json", "cannot open [redacted]"),
            (
                "connect to http://gpu-box.internal:7411/v1 failed",
                "connect to [redacted] failed",
            ),
            ("peer 10.1.2.3:7411 reset", "peer [redacted] reset"),
            ("peer [::1]:80 reset", "peer [redacted] reset"),
            ("host gpu-box.internal:7411.", "host [redacted]."),
            ("read 'var/run/x.sock' failed", "read '[redacted]' failed"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_message(input), want, "for {input:?}");
        }
    }

    #[test]
    fn ordinary_words_survive() {
        let msg = "runtime gpu-box: 3 of 4 workers lost, retry in 2s (code: lost)";
        assert_eq!(sanitize_message(msg), msg);
    }

    #[test]
    fn long_messages_are_cut_and_controls_removed() {
        let long = "x".repeat(2000);
        assert!(sanitize_message(&long).chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(sanitize_message("a\nb\u{7}c"), "a b c");
    }
}
