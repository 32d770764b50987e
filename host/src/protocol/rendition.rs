//! A guest's rendition of the master's frames (docs/protocol.md, "What a
//! guest is given to read").
//!
//! A WASI guest decodes CBOR with its pure-Python codec: about 70 bytecodes
//! per item, run five times slower than natively, and most of a sandboxed
//! call's time. Its CPython has the C unpickler, which reads the same values
//! several times faster. So the host gives a guest that asks for it (its
//! hello says `renditions`) each message of the master as a pickle of the same
//! value, written here from the CBOR: data opcodes only (what [`Writer`]
//! writes for plain-data blocks), and each of the kernel's own tags (a
//! reference to a function, a twin reference, an exception) as a persistent
//! id `(tag, content)`, which the guest's unpickler hands to the same tag
//! hook its CBOR decoder calls. No opcode names a global or calls anything.
//! After the pickle's STOP come the message's kind, id and chain (as
//! [`peek_header`] reads them), so the guest routes a frame without
//! unpickling it.
//!
//! What this does not render (shared values, complex numbers, plain-data
//! blocks, strs with surrogates, indefinite lengths, simple values other than
//! false, true and null, very deep values) leaves the frame as it was: CBOR,
//! which the guest decodes as before. Frames that come from a guest are never
//! rendered: they are CBOR, checked by the host and decoded by the master.

use super::header::peek_header;
use super::plain::{op, Writer};
use super::tags::{BYTEARRAY, FROZENSET, NEG_BIGNUM, POS_BIGNUM, SET, TUPLE};
use super::tags::{COMPLEX, PLAIN, SHAREABLE, SHARED_REF, SURROGATE_STR};
use super::value::f16_to_f64;

/// Pickle's opcode for a persistent id taken from the stack.
const BINPERSID: u8 = b'Q';

/// The bytes after a rendition's STOP: kind (u8), which of id and chain are
/// there (bit 0: id, bit 1: chain), id and chain (u64, little-endian).
pub const TRAILER_LEN: usize = 18;

/// Nesting rendered at most (each array, map and tag is a level): deeper
/// values stay CBOR, whose decoder says how deep it allows.
const MAX_NESTING: usize = 128;

/// Larger frames go as they are: their cost in the guest is their large
/// strs and bytes (one copy from the CBOR), not their items (large plain
/// containers are plain-data blocks), and a rendition would copy them twice.
pub const MAX_RENDERED: usize = 64 * 1024;

/// The rendition of a message frame of the master, or None when it is not
/// a message or holds something not rendered (the frame then goes as it is).
pub fn render(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() > MAX_RENDERED {
        return None;
    }
    let header = peek_header(frame)?;
    let kind = u8::try_from(header.kind?).ok()?;
    let mut reader = Reader {
        data: frame,
        pos: 0,
        writer: Writer {
            out: Vec::with_capacity(frame.len() + 32 + TRAILER_LEN),
        },
    };
    reader.writer.start();
    reader.item(0)?;
    if reader.pos != frame.len() {
        return None; // (trailing bytes: the CBOR decoder's error to give)
    }
    reader.writer.end();
    let mut out = reader.writer.out;
    let flags = u8::from(header.id.is_some()) | (u8::from(header.chain.is_some()) << 1);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&header.id.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&header.chain.unwrap_or(0).to_le_bytes());
    Some(out)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    writer: Writer,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.pos.checked_add(n)?;
        let bytes = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn be(&mut self, width: u64) -> Option<u64> {
        Some(self.take(width)?.iter().fold(0, |n, &b| (n << 8) | u64::from(b)))
    }

    /// The argument of a head whose additional information is `ai` (None
    /// for an indefinite length or a reserved value).
    fn argument(&mut self, ai: u8) -> Option<u64> {
        match ai {
            0..=23 => Some(u64::from(ai)),
            24 => self.be(1),
            25 => self.be(2),
            26 => self.be(4),
            27 => self.be(8),
            _ => None,
        }
    }

    fn item(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_NESTING {
            return None;
        }
        let ib = *self.data.get(self.pos)?;
        self.pos += 1;
        let (major, ai) = (ib >> 5, ib & 0x1f);
        if major == 7 {
            return self.simple(ai);
        }
        let n = self.argument(ai)?;
        match major {
            0 => self.uint(n),
            1 => self.nint(n),
            2 => {
                let bytes = self.take(n)?;
                self.writer.bytes(bytes);
            }
            3 => {
                let text = self.take(n)?;
                std::str::from_utf8(text).ok()?; // (the CBOR decoder's error to give)
                self.writer.str(text);
            }
            4 => {
                self.writer.op(op::EMPTY_LIST);
                self.items(n, op::APPENDS, depth)?;
            }
            5 => {
                self.writer.op(op::EMPTY_DICT);
                if n > 0 {
                    self.writer.op(op::MARK);
                    for _ in 0..n {
                        self.item(depth + 1)?;
                        self.item(depth + 1)?;
                    }
                    self.writer.op(op::SETITEMS);
                }
            }
            _ => self.tag(n, depth)?,
        }
        Some(())
    }

    /// `n` items after a MARK, then `close` (nothing for none: the list,
    /// dict or set is there already).
    fn items(&mut self, n: u64, close: u8, depth: usize) -> Option<()> {
        if n > 0 {
            self.marked(n, close, depth)?;
        }
        Some(())
    }

    /// `n` items after a MARK, then `close`, which makes them one value.
    fn marked(&mut self, n: u64, close: u8, depth: usize) -> Option<()> {
        self.writer.op(op::MARK);
        for _ in 0..n {
            self.item(depth + 1)?;
        }
        self.writer.op(close);
        Some(())
    }

    /// The head of a tag's content, which must be of `major` type (else the
    /// frame stays CBOR, whose decoder refuses it); its argument.
    fn content(&mut self, major: u8) -> Option<u64> {
        let ib = *self.data.get(self.pos)?;
        if ib >> 5 != major {
            return None;
        }
        self.pos += 1;
        self.argument(ib & 0x1f)
    }

    fn tag(&mut self, tag: u64, depth: usize) -> Option<()> {
        match tag {
            TUPLE => {
                let n = self.content(4)?;
                self.marked(n, op::TUPLE, depth + 1)?;
            }
            SET => {
                let n = self.content(4)?;
                self.writer.op(op::EMPTY_SET);
                self.items(n, op::ADDITEMS, depth + 1)?;
            }
            FROZENSET => {
                let n = self.content(4)?;
                self.marked(n, op::FROZENSET, depth + 1)?;
            }
            BYTEARRAY => {
                let n = self.content(2)?;
                let bytes = self.take(n)?;
                self.writer.bytearray(bytes);
            }
            POS_BIGNUM | NEG_BIGNUM => {
                let n = self.content(2)?;
                let magnitude = self.take(n)?;
                self.bignum(magnitude, tag == NEG_BIGNUM);
            }
            COMPLEX | PLAIN | SHAREABLE | SHARED_REF | SURROGATE_STR => return None,
            _ => {
                // the kernel's: a persistent id (tag, content) for its tag hook
                self.writer.int(i64::try_from(tag).ok()?);
                self.item(depth + 1)?;
                self.writer.op(op::TUPLE2);
                self.writer.op(BINPERSID);
            }
        }
        Some(())
    }

    fn uint(&mut self, n: u64) {
        match i64::try_from(n) {
            Ok(n) => self.writer.int(n),
            Err(_) => {
                let mut bytes = n.to_le_bytes().to_vec();
                bytes.push(0); // (its top bit is set: a sign byte keeps it positive)
                self.writer.long(&bytes);
            }
        }
    }

    /// The CBOR negative integer -1 - n.
    fn nint(&mut self, n: u64) {
        match i64::try_from(n) {
            Ok(n) => self.writer.int(-1 - n),
            Err(_) => {
                // -1 - n is !n in two's complement: n's bytes inverted, and
                // a sign byte (n's top bit is set, so the inverted top is clear)
                let mut bytes: Vec<u8> = n.to_le_bytes().iter().map(|b| !b).collect();
                bytes.push(0xff);
                self.writer.long(&bytes);
            }
        }
    }

    /// A bignum's big-endian magnitude, as pickle's little-endian two's
    /// complement (for a negative one, -1 - magnitude: its bits inverted).
    fn bignum(&mut self, magnitude: &[u8], negative: bool) {
        let mut bytes: Vec<u8> = magnitude.iter().rev().copied().collect();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        if bytes.last().is_some_and(|&top| top & 0x80 != 0) || bytes.is_empty() {
            bytes.push(0);
        }
        if negative {
            bytes.iter_mut().for_each(|b| *b = !*b);
        }
        self.writer.long(&bytes);
    }

    fn simple(&mut self, ai: u8) -> Option<()> {
        match ai {
            20 => self.writer.op(op::NEWFALSE),
            21 => self.writer.op(op::NEWTRUE),
            22 => self.writer.op(op::NONE),
            25 => {
                let bits = self.be(2)?;
                self.writer.float(f16_to_f64(bits as u16));
            }
            26 => {
                let bits = self.be(4)?;
                self.writer.float(f64::from(f32::from_bits(bits as u32)));
            }
            27 => {
                let bits = self.be(8)?;
                self.writer.float(f64::from_bits(bits));
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_rendered_with_its_header_after_the_pickle() {
        // [0, 7, 1000, 0, [1, "a", -2, null, true, 1.5]]
        let frame = [
            0x85, 0x00, 0x07, 0x19, 0x03, 0xe8, 0x00, 0x86, 0x01, 0x61, 0x61, 0x21, 0xf6, 0xf5, 0xf9, 0x3e,
            0x00,
        ];
        let out = render(&frame).expect("a plain request is rendered");
        assert_eq!(&out[..3], &[op::PROTO, 5, op::FRAME]);
        let (pickle, trailer) = out.split_at(out.len() - TRAILER_LEN);
        assert_eq!(pickle.last(), Some(&op::STOP));
        assert_eq!(trailer[..2], [0, 0b11]);
        assert_eq!(u64::from_le_bytes(trailer[2..10].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(trailer[10..].try_into().unwrap()), 1000);
    }

    #[test]
    fn cut_or_garbled_frames_are_left_as_they_are() {
        let frame = [0x85, 0x00, 0x07, 0x19, 0x03, 0xe8, 0x00, 0x82, 0x61, 0x61];
        for end in 0..frame.len() {
            assert_eq!(render(&frame[..end]), None, "cut at {end}");
        }
        // a deterministic stream of garbage behind a message's head: never a panic
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut bytes = vec![0x85, 0x00, 0x01, 0x02, 0x00];
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            let _ = render(&bytes);
        }
    }
}
