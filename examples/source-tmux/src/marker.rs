//! The mark a worker's wrapper prints once its command has ended: everything before it in
//! the pane's output is the command's, complete, and it carries the exit status.
//!
//! It reads `ESC ] roster-end ; <nonce> ; <status, 3 digits> BEL`, an operating system
//! command that terminals ignore. The nonce is random per worker, so the command's own
//! output does not end the worker by chance.

/// Finds the end mark in a pane's output, read piece by piece, and takes it out.
#[derive(Debug)]
pub(crate) struct EndMark {
    prefix: Vec<u8>,
    /// Bytes held back: they may be the start of the mark.
    held: Vec<u8>,
    found: bool,
}

/// The status digits and the terminator after the prefix.
const TAIL: usize = 4;

impl EndMark {
    pub(crate) fn new(nonce: &str) -> EndMark {
        EndMark {
            prefix: format!("\x1b]roster-end;{nonce};").into_bytes(),
            held: Vec::new(),
            found: false,
        }
    }

    /// The `printf` format the wrapper prints the mark with (`%03d` takes the status).
    pub(crate) fn printf_format(nonce: &str) -> String {
        format!("\\033]roster-end;{nonce};%03d\\007")
    }

    /// Takes `data`, the next bytes of output: returns the bytes to pass on now, and the
    /// status once the mark is found (bytes after it are passed on as they come).
    pub(crate) fn feed(&mut self, data: &[u8]) -> (Vec<u8>, Option<i32>) {
        if self.found {
            return (data.to_vec(), None);
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let mut from = 0;
        while let Some(i) = find(&buf[from..], &self.prefix).map(|i| i + from) {
            let end = i + self.prefix.len() + TAIL;
            if buf.len() < end {
                // The mark may be cut off here: wait for the rest.
                self.held = buf.split_off(i);
                return (buf, None);
            }
            let tail = &buf[i + self.prefix.len()..end];
            if tail[..3].iter().all(u8::is_ascii_digit) && tail[3] == 0x07 {
                let status = tail[..3]
                    .iter()
                    .fold(0, |n, d| n * 10 + i32::from(d - b'0'));
                self.found = true;
                let mut out = buf[..i].to_vec();
                out.extend_from_slice(&buf[end..]);
                return (out, Some(status));
            }
            from = i + 1;
        }
        let keep = self.partial_len(&buf);
        self.held = buf.split_off(buf.len() - keep);
        (buf, None)
    }

    /// What is held back, at the end of the output.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// The length of the longest end of `buf` that starts the prefix.
    fn partial_len(&self, buf: &[u8]) -> usize {
        let longest = buf.len().min(self.prefix.len() - 1);
        (1..=longest)
            .rev()
            .find(|&k| buf.ends_with(&self.prefix[..k]))
            .unwrap_or(0)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(nonce: &str, status: i32) -> Vec<u8> {
        format!("\x1b]roster-end;{nonce};{status:03}\x07").into_bytes()
    }

    #[test]
    fn the_mark_is_found_and_taken_out_however_the_output_is_cut() {
        let mut whole = b"hello \x1b[1mworld\x1b]0;title\x07\n".to_vec();
        whole.extend(mark("abc", 42));
        whole.extend(b"after");
        for cut in 1..whole.len() {
            let mut m = EndMark::new("abc");
            let mut out = Vec::new();
            let mut statuses = Vec::new();
            for piece in whole.chunks(cut) {
                let (bytes, status) = m.feed(piece);
                out.extend(bytes);
                statuses.extend(status);
            }
            out.extend(m.finish());
            assert_eq!(statuses, [42], "pieces of {cut}");
            assert_eq!(
                out, b"hello \x1b[1mworld\x1b]0;title\x07\nafter",
                "pieces of {cut}"
            );
        }
    }

    #[test]
    fn another_nonce_or_a_malformed_mark_is_output() {
        let mut m = EndMark::new("abc");
        let mut other = mark("abd", 1);
        other.extend(b"\x1b]roster-end;abc;4x2\x07");
        let (out, status) = m.feed(&other);
        let mut all = out;
        all.extend(m.finish());
        assert_eq!(status, None);
        assert_eq!(all, other);
    }

    #[test]
    fn a_held_start_that_is_no_mark_comes_out_with_the_next_bytes_or_at_the_end() {
        let mut m = EndMark::new("abc");
        let (out, _) = m.feed(b"x\x1b]ros");
        assert_eq!(out, b"x");
        let (out, _) = m.feed(b"ewood");
        assert_eq!(out, b"\x1b]rosewood");
        let (out, _) = m.feed(b"y\x1b");
        assert_eq!(out, b"y");
        assert_eq!(m.finish(), b"\x1b");
    }

    #[test]
    fn the_printf_format_prints_the_mark() {
        let out = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                &format!("printf '{}' 7", EndMark::printf_format("n0")),
            ])
            .output()
            .unwrap();
        assert_eq!(out.stdout, mark("n0", 7));
    }
}
