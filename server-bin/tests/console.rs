//! The console served at `GET /` is one self-contained page: no remote script, style or
//! import, no `innerHTML`, and a token kept only for the tab's session.

const CONSOLE: &str = include_str!("../src/console.html");

#[test]
fn the_console_is_self_contained() {
    assert!(CONSOLE.starts_with("<!doctype html>"));
    assert!(CONSOLE.trim_end().ends_with("</html>"));
    for banned in [
        "innerHTML",
        "<link",
        "src=\"http",
        "src='http",
        "@import",
        "eval(",
    ] {
        assert!(!CONSOLE.contains(banned), "console.html holds {banned}");
    }
    assert!(CONSOLE.contains("sessionStorage"));
    assert!(!CONSOLE.contains("localStorage"));
    // One hand-readable page: the table, the pane with its ANSI renderer and the stream
    // client fit in well under this.
    assert!(CONSOLE.lines().count() < 1400);
}
