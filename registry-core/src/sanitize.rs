//! Scrubbing of messages that come from sources before a client sees them.

/// What stands in place of a removed piece of internal authority.
pub const REDACTED: &str = "[redacted]";

/// The most characters of a message a client is shown.
const MAX_MESSAGE_CHARS: usize = 512;

/// Returns `message` with anything that looks like internal authority replaced by
/// `[redacted]`: file paths, URLs, IP addresses (with or without a port or zone),
/// `host:port` pairs and `user@host`, also inside `key=value`. Control characters become
/// spaces and runs of white space one space; long messages are cut to 512 characters.
///
/// Sources should write clean messages in the first place; this is the registry's second
/// line of defence for health messages, diagnostics and error messages. It works word by
/// word, so a path with spaces in it loses only its first word.
pub fn sanitize_message(message: &str) -> String {
    let plain: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out = plain
        .split_whitespace()
        .map(sanitize_word)
        .collect::<Vec<_>>()
        .join(" ");
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push('…');
    }
    out
}

fn sanitize_word(word: &str) -> String {
    // Try the word without surrounding punctuation, brackets kept first (for `[::1]:80`),
    // then without brackets too (for `(/some/path)`).
    for edges in ["\"'`(),;.!?", "\"'`()[]{}<>,;.!?"] {
        let is_edge = |c: char| edges.contains(c);
        let start = word.find(|c| !is_edge(c)).unwrap_or(word.len());
        // The end is past the last kept character, which may be wider than one byte.
        let end = word
            .char_indices()
            .rev()
            .find(|&(_, c)| !is_edge(c))
            .map_or(start, |(i, c)| i + c.len_utf8());
        if start >= end {
            continue;
        }
        let core = &word[start..end];
        // `addr=10.0.0.1:80`, `peer=alice@host`: judge each side of `=` too.
        if looks_internal(core) || core.split('=').any(looks_internal) {
            return format!("{}{}{}", &word[..start], REDACTED, &word[end..]);
        }
    }
    word.to_string()
}

fn looks_internal(token: &str) -> bool {
    let token = token.trim_end_matches(':');
    if token.is_empty() {
        return false;
    }
    // URLs, and `file:/x`-style ones.
    if token.contains("://") || token.contains(":/") {
        return true;
    }
    // user@host, mail addresses.
    if let Some((user, host)) = token.split_once('@') {
        if !user.is_empty() && !host.is_empty() {
            return true;
        }
    }
    if token.starts_with('/') && token.len() > 1
        || token.starts_with("~/")
        || token.starts_with("./")
        || token.starts_with("../")
    {
        return true;
    }
    // Relative paths: three segments, or two where one names a file (`run/w1.sock`), but
    // not `and/or`, `stdin/stdout` or `3/4`.
    if token.contains('/') {
        let segments: Vec<&str> = token.split('/').filter(|s| !s.is_empty()).collect();
        if segments.len() >= 3 || (segments.len() == 2 && segments.iter().any(|s| s.contains('.')))
        {
            return true;
        }
    }
    // IP addresses, with a port, a zone (`fe80::1%eth0`) or brackets.
    let unzoned = token.split('%').next().unwrap_or(token);
    if unzoned.parse::<std::net::IpAddr>().is_ok() || token.parse::<std::net::SocketAddr>().is_ok()
    {
        return true;
    }
    // host:port, e.g. `gpu-box.internal:7411` or `buildhost:7411`, but not `12:30` or
    // `error:2`.
    if let Some((host, port)) = token.rsplit_once(':') {
        let host_like = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        let port_like =
            !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit());
        let named = host.contains('.') || host.contains('-') || host == "localhost";
        if host_like && port_like && (named || port.len() >= 3) {
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
            (
                "connect failed:\n10.1.2.3:7411",
                "connect failed: [redacted]",
            ),
            ("peer\t10.1.2.3:7411 reset", "peer [redacted] reset"),
            ("ssh alice@10.1.2.3 refused", "ssh [redacted] refused"),
            (
                "ssh alice@gpu-box.internal:22 refused",
                "ssh [redacted] refused",
            ),
            (
                "connect failed: addr=10.1.2.3:7411",
                "connect failed: [redacted]",
            ),
            ("host=gpu-box.internal:7411 down", "[redacted] down"),
            (
                "peer fe80::1%eth0 unreachable",
                "peer [redacted] unreachable",
            ),
            ("open file:/etc/roster/token", "open [redacted]"),
            ("dial buildhost:7411 failed", "dial [redacted] failed"),
            ("socket run/w1.sock gone", "socket [redacted] gone"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_message(input), want, "for {input:?}");
        }
    }

    #[test]
    fn ordinary_words_survive() {
        for msg in [
            "runtime gpu-box: 3 of 4 workers lost, retry in 2s (code: lost)",
            "input and/or output closed",
            "stdin/stdout of the worker closed",
            "retry at 12:30 today",
            "see error:2 in the code",
            "3/4 workers lost",
            "limit=256 reached",
        ] {
            assert_eq!(sanitize_message(msg), msg);
        }
    }

    #[test]
    fn words_ending_in_wide_characters_are_kept_whole() {
        for msg in [
            "¡",
            "profile ¡ not found",
            "upstream says: caf\u{e9}",
            "(日本語)",
            "«/run/x.sock»",
            "emoji 🎉!",
            "\u{10ffff}.",
        ] {
            let out = sanitize_message(msg);
            assert!(!out.is_empty(), "for {msg:?}");
        }
        assert_eq!(
            sanitize_message("profile ¡ not found"),
            "profile ¡ not found"
        );
        assert_eq!(sanitize_message("(日本語)"), "(日本語)");
        assert_eq!(sanitize_message("open (/run/ü.sock)"), "open ([redacted])");
    }

    #[test]
    fn long_messages_are_cut_and_controls_removed() {
        let long = "x".repeat(2000);
        assert!(sanitize_message(&long).chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(sanitize_message("a\nb\u{7}c"), "a b c");
    }
}
