//! Keeping chunk boundaries off the middle of a UTF-8 character.

/// Returns how many bytes of `buf` can be emitted now.
///
/// The rest (at most 3 bytes) is the start of a UTF-8 multi-byte sequence that is valid so far
/// but cut off by the end of the read; the caller carries it into the next chunk of the same
/// stream. Invalid bytes are never held back: only a tail that could still become a valid
/// character is.
pub(crate) fn complete_prefix_len(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=3.min(len) {
        let start = len - back;
        let byte = buf[start];
        if byte & 0b1100_0000 == 0b1000_0000 {
            // A continuation byte: the sequence, if any, starts further back.
            continue;
        }
        return match std::str::from_utf8(&buf[start..]) {
            // `error_len() == None` means "valid so far, but the input ended".
            Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => start,
            _ => len,
        };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::complete_prefix_len;

    #[test]
    fn ascii_and_complete_characters_are_emitted_whole() {
        assert_eq!(complete_prefix_len(b""), 0);
        assert_eq!(complete_prefix_len(b"hello"), 5);
        assert_eq!(complete_prefix_len("héllo €".as_bytes()), "héllo €".len());
        assert_eq!(complete_prefix_len("😀".as_bytes()), 4);
    }

    #[test]
    fn a_character_split_by_the_read_is_held_back() {
        let smile = "😀".as_bytes();
        for cut in 1..4 {
            let mut buf = b"ab".to_vec();
            buf.extend_from_slice(&smile[..cut]);
            assert_eq!(complete_prefix_len(&buf), 2, "cut after {cut} bytes");
        }
        let euro = "€".as_bytes();
        assert_eq!(complete_prefix_len(&euro[..2]), 0);
        assert_eq!(complete_prefix_len(&[b'x', 0xC3]), 1);
    }

    #[test]
    fn carrying_the_tail_rebuilds_every_character() {
        let text = "aé€😀z".repeat(50);
        let bytes = text.as_bytes();
        // Cut the stream into reads of every size and check no chunk splits a character.
        for read_size in 1..9 {
            let mut carry: Vec<u8> = Vec::new();
            let mut out: Vec<u8> = Vec::new();
            for read in bytes.chunks(read_size) {
                let mut buf = std::mem::take(&mut carry);
                buf.extend_from_slice(read);
                let keep = complete_prefix_len(&buf);
                let chunk = &buf[..keep];
                assert!(std::str::from_utf8(chunk).is_ok(), "read size {read_size}");
                out.extend_from_slice(chunk);
                carry = buf[keep..].to_vec();
                assert!(carry.len() <= 3);
            }
            out.extend_from_slice(&carry);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn invalid_bytes_are_never_held_back() {
        assert_eq!(complete_prefix_len(&[b'a', 0xFF]), 2);
        assert_eq!(complete_prefix_len(&[b'a', 0x80]), 2);
        assert_eq!(complete_prefix_len(&[0x80, 0x80, 0x80]), 3);
        // 0xE0 0x80 can never start a valid character (overlong encoding).
        assert_eq!(complete_prefix_len(&[b'a', 0xE0, 0x80]), 3);
        // 0xF5 and up are never valid lead bytes.
        assert_eq!(complete_prefix_len(&[0xF5]), 1);
        // A complete character followed by a stray continuation byte.
        assert_eq!(complete_prefix_len(&[0xC3, 0xA9, 0x80]), 3);
    }
}
