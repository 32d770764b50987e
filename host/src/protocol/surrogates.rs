//! UTF-8 in which surrogate code points (U+D800..U+DFFF, as the three bytes
//! `ed a0 80`..`ed bf bf`) may stand alone, as Python's `"surrogatepass"`
//! writes and reads it: the content of tag 40015 (docs/protocol.md), and a
//! pickle's strs in a plain-data block.

/// A piece of such UTF-8: well-formed text, or one surrogate.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Surrogate(u16),
}

/// Hands `each` the pieces of `bytes` in order; whether `bytes` is such
/// UTF-8 throughout (if not, the pieces before the fault were handed).
/// Text is checked by `std::str::from_utf8`, whose rules (no overlong
/// forms, nothing past U+10FFFF) are Python's.
pub fn split_passing_surrogates<'a>(bytes: &'a [u8], mut each: impl FnMut(Piece<'a>)) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(text) => (text, &rest[rest.len()..]),
            Err(err) => {
                let (valid, bad) = rest.split_at(err.valid_up_to());
                // SAFETY: from_utf8 found these bytes valid
                (unsafe { std::str::from_utf8_unchecked(valid) }, bad)
            }
        };
        if !valid.is_empty() {
            each(Piece::Text(valid));
        }
        if bad.is_empty() {
            break;
        }
        match *bad {
            [0xed, second @ 0xa0..=0xbf, third @ 0x80..=0xbf, ..] => {
                each(Piece::Surrogate(
                    0xd000 | (u16::from(second) & 0x3f) << 6 | (u16::from(third) & 0x3f),
                ));
            }
            _ => return false,
        }
        rest = &bad[3..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{split_passing_surrogates, Piece};

    fn pieces(bytes: &[u8]) -> Option<Vec<Piece<'_>>> {
        let mut found = Vec::new();
        split_passing_surrogates(bytes, |piece| found.push(piece)).then_some(found)
    }

    #[test]
    fn text_and_lone_surrogates_come_in_order() {
        let text = "a\u{e9}\u{20ac}\u{1f600}\u{10ffff}";
        assert_eq!(pieces(text.as_bytes()), Some(vec![Piece::Text(text)]));
        assert_eq!(pieces(b""), Some(vec![]));
        // a pair stays two surrogates, as Python's "surrogatepass" reads it
        assert_eq!(
            pieces(b"\xed\xb3\xbfx\xed\xa0\xbd\xed\xb8\x80\xed\x9f\xbf"),
            Some(vec![
                Piece::Surrogate(0xdcff),
                Piece::Text("x"),
                Piece::Surrogate(0xd83d),
                Piece::Surrogate(0xde00),
                Piece::Text("\u{d7ff}"),
            ])
        );
    }

    #[test]
    fn what_strict_utf8_refuses_but_a_surrogate_is_refused() {
        for bad in [
            &b"\xff"[..],
            b"\xc0\x80",         // overlong
            b"\xe0\x80\xbf",     // overlong
            b"\xf0\x80\x80\x80", // overlong
            b"\xf4\x90\x80\x80", // past U+10FFFF
            b"ok\xed\xa0",       // cut short
            b"\xed\xa0\x41",     // not a continuation
            b"\x80",
            b"\xf8\x88\x80\x80\x80",
        ] {
            assert_eq!(pieces(bad), None, "{bad:x?}");
        }
    }
}
