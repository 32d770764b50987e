//! The decoding budget (docs/protocol.md, "Decoding budget").
//!
//! [`estimate`] walks one frame's CBOR heads, allocating nothing, and adds
//! up what decoding it would cost the decoding interpreter in memory: the
//! objects the codec would make. `cpy2py._host.loads(data, budget=n)` runs
//! it first and refuses a frame whose estimate passes `n` before a single
//! object is made; the pure-Python codec (codec_py.py, `_cost_*`) computes
//! the same number for every input, so both codecs accept and refuse the
//! same frames (tests/test_codec.py checks that they agree).
//!
//! The estimate is a function of the bytes alone. Charges are never
//! negative, so the running total passes the budget somewhere in the frame
//! exactly when the whole estimate does: where the walk stops does not
//! change the verdict.

use super::plain;
use super::tags;
use super::value::{enter, Cursor, Head};
use crate::error::HostError;

/// What objects cost, in bytes: CPython 3.12+ on 64-bit, `sys.getsizeof`
/// rounded up to 16 (pymalloc's size classes), one table for the compiled
/// codec; codec_py.py holds the same numbers. Measured with `sys.getsizeof`
/// on CPython 3.9-3.13 (x86-64): `[]` 56, `()` 40 + 8 per item, `{}` 64,
/// `{'a': 1}` 184 and `{1: 1}` 224 (3.11+; 232 both on 3.9 and 3.10),
/// `set()` 216, `''` 41 (3.12+; 49 before) + 1 per ASCII byte, `b''`
/// 33 + 1 per byte, `bytearray()` 56, `300` 28, `2**60` 36, `1.5` 24,
/// `1j` 32. Cached singletons (None, True, False, ints -5..=256, `''` and
/// one-character ASCII strings, `b''` and one-byte bytes, `()`) cost
/// nothing but the slot that holds them, which their container pays.
pub mod cost {
    /// A reference in a list or tuple (dict entries and set slots are in
    /// their tables).
    pub const SLOT: u64 = 8;
    /// A list (56) without its slots.
    pub const LIST: u64 = 64;
    /// A non-empty tuple without its slots (one allocation, with them).
    pub const TUPLE: u64 = 40;
    /// An empty dict; a non-empty one adds its keys table ([`super::dict_cost`]).
    pub const DICT: u64 = 64;
    /// The header of a dict's keys table.
    pub const DICT_KEYS: u64 = 32;
    /// An entry of a keys table whose keys are all `str` (hash, value)...
    pub const DICT_ENTRY_STR: u64 = 16;
    /// ... and of any other (hash, key, value).
    pub const DICT_ENTRY: u64 = 24;
    /// A set or frozenset (216) with its 8 inline slots; a larger table is
    /// another allocation of 16 bytes per slot ([`super::set_cost`]).
    pub const SET: u64 = 224;
    pub const SET_SLOT: u64 = 16;
    /// An int beyond the cache (-5..=256) whose magnitude is below 2**60
    /// (28 or 32), and one up to 2**64 (36).
    pub const INT: u64 = 32;
    pub const INT_64: u64 = 48;
    /// A bignum: 24 + 4 per 30-bit digit, rounded ([`super::bignum_cost`]).
    pub const BIGNUM_HEADER: u64 = 24;
    pub const FLOAT: u64 = 32;
    pub const COMPLEX: u64 = 32;
    /// A str of more than one byte: 41 + its UTF-8 length, rounded (ASCII
    /// exactly; text with a character beyond U+00FF is stored at 2 or 4
    /// bytes per character: up to 4 times this, see docs/protocol.md).
    pub const STR_HEADER: u64 = 41;
    /// A bytes of more than one byte: 33 + its length, rounded.
    pub const BYTES_HEADER: u64 = 33;
    /// A bytearray (56); its buffer of length + 1 is another allocation.
    pub const BYTEARRAY: u64 = 64;
    /// What a tag hook makes of a kernel tag (a reference, an exception):
    /// charged on top of its content.
    pub const HOOK: u64 = 64;
    /// Each chunk of an indefinite-length string (the pure-Python codec
    /// keeps two references per chunk while joining them).
    pub const CHUNK: u64 = 16;
}

/// Rounds up to pymalloc's 16-byte size classes.
const fn round16(n: u64) -> u64 {
    (n + 15) & !15
}

/// A dict of `n` entries as CPython builds it by inserting them: a table of
/// `size` slots (a power of two, at least 8) holding `2 * size / 3` entries,
/// with 1, 2, 4 or 8 bytes of index per slot.
pub fn dict_cost(n: u64, str_keys: bool) -> u64 {
    if n == 0 {
        return cost::DICT;
    }
    let mut size: u64 = 8;
    while size * 2 / 3 < n {
        size *= 2;
    }
    let index = match size {
        0..=0x80 => 1,
        0x81..=0x8000 => 2,
        0x8001..=0x8000_0000 => 4,
        _ => 8,
    };
    let entry = if str_keys {
        cost::DICT_ENTRY_STR
    } else {
        cost::DICT_ENTRY
    };
    cost::DICT + round16(cost::DICT_KEYS + size * index + size * 2 / 3 * entry)
}

/// A set or frozenset of `n` distinct items as CPython builds it by adding
/// them: 8 inline slots; when 3/5 of the table is used it moves to the
/// smallest power of two above 4 (above 50,000 items: 2) times the items.
pub fn set_cost(n: u64) -> u64 {
    let mut size: u64 = 8;
    // the number of items at which the table grows: fill * 5 >= mask * 3
    let mut grow_at = (3 * (size - 1)).div_ceil(5);
    while n >= grow_at {
        let wanted = if grow_at > 50_000 {
            2 * grow_at
        } else {
            4 * grow_at
        };
        while size <= wanted {
            size *= 2;
        }
        grow_at = (3 * (size - 1)).div_ceil(5);
    }
    if size == 8 {
        cost::SET
    } else {
        cost::SET + size * cost::SET_SLOT
    }
}

/// An int whose magnitude is `m` (`n` for `n >= 0`, `-n` otherwise), not cached.
fn int_cost(magnitude: u128) -> u64 {
    if magnitude < 1 << 60 {
        cost::INT
    } else {
        cost::INT_64
    }
}

/// A bignum whose magnitude has `len` bytes: 30-bit digits (one more bit
/// for `-1 - n`).
pub fn bignum_cost(len: u64) -> u64 {
    round16(cost::BIGNUM_HEADER + 4 * ((8 * len + 30) / 30))
}

const fn str_cost(len: u64) -> u64 {
    round16(cost::STR_HEADER + len)
}

const fn bytes_cost(len: u64) -> u64 {
    round16(cost::BYTES_HEADER + len)
}

/// The size and cost of the items whose initial byte says both (size 0:
/// read the head): small ints, strings of up to 23 bytes, false, true,
/// null and floats. codec_py.py has the same table (`_FIXED_COST`).
const FIXED: [(u8, u16); 256] = fixed_table();

const fn fixed_table() -> [(u8, u16); 256] {
    let mut table = [(0u8, 0u16); 256];
    let mut n = 0;
    while n < 24 {
        let len = n as u64;
        table[n] = (1, 0); // 0..23
        table[0x20 | n] = (1, if n < 5 { 0 } else { cost::INT as u16 }); // -1..-24
        table[0x40 | n] = (1 + n as u8, if n < 2 { 0 } else { bytes_cost(len) as u16 });
        table[0x60 | n] = (1 + n as u8, if n < 2 { 0 } else { str_cost(len) as u16 });
        n += 1;
    }
    table[0x18] = (2, 0); // 24..255
    table[0xf4] = (1, 0);
    table[0xf5] = (1, 0);
    table[0xf6] = (1, 0);
    table[0xf9] = (3, cost::FLOAT as u16);
    table[0xfa] = (5, cost::FLOAT as u16);
    table[0xfb] = (9, cost::FLOAT as u16);
    table
}

/// The verdict of [`estimate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// The estimate of the whole frame, at most the budget.
    Within(u64),
    /// The running estimate passed the budget at this offset.
    Over { offset: usize },
    /// The walk stopped at malformed input; the decoder says what is wrong.
    Malformed,
}

enum Stop {
    Over(usize),
    Malformed,
}

impl From<HostError> for Stop {
    fn from(_: HostError) -> Self {
        Stop::Malformed
    }
}

/// Estimates what decoding `frame` costs, stopping as soon as the estimate
/// passes `budget`.
pub fn estimate(frame: &[u8], budget: u64) -> Estimate {
    let mut walk = Walk {
        cursor: Cursor::new(frame),
        total: 0,
        budget,
    };
    match walk
        .next(0)
        .and_then(|_| walk.cursor.finish().map_err(Stop::from))
    {
        Ok(()) => Estimate::Within(walk.total),
        Err(Stop::Over(offset)) => Estimate::Over { offset },
        Err(Stop::Malformed) => Estimate::Malformed,
    }
}

/// The message of a frame refused by the budget; codec_py.py words it the same.
pub fn refusal(frame_len: usize, budget: u64, offset: usize) -> String {
    format!(
        "a frame of {frame_len} bytes would cost more than the decoding budget of {budget} bytes \
         of objects (the estimate passed it at offset {offset}); it was refused before decoding. \
         The peer sent data that is costly to decode (many small containers, strings or numbers): \
         send it in several smaller frames (calls), or packed as bytes or str"
    )
}

struct Walk<'a> {
    cursor: Cursor<'a>,
    total: u64,
    budget: u64,
}

impl Walk<'_> {
    fn charge(&mut self, n: u64) -> Result<(), Stop> {
        self.total = self.total.saturating_add(n);
        if self.total > self.budget {
            Err(Stop::Over(self.cursor.offset()))
        } else {
            Ok(())
        }
    }

    /// Walks the item at the cursor, enclosed by `depth` containers: the
    /// small ones straight from [`FIXED`], the others by their head.
    #[inline]
    fn next(&mut self, depth: usize) -> Result<(), Stop> {
        let rest = self.cursor.rest();
        let Some(&initial) = rest.first() else {
            return self.item(depth);
        };
        let (size, cost) = FIXED[usize::from(initial)];
        if size != 0 && usize::from(size) <= rest.len() {
            self.cursor.skip(usize::from(size));
            return if cost == 0 {
                Ok(())
            } else {
                self.charge(u64::from(cost))
            };
        }
        // ints of 16 and 32 bits: what item() does, without building a Head
        let (size, value) = match (initial, rest) {
            (0x19 | 0x39, [_, a, b, ..]) => (3, u64::from(u16::from_be_bytes([*a, *b]))),
            (0x1a | 0x3a, [_, a, b, c, d, ..]) => (5, u64::from(u32::from_be_bytes([*a, *b, *c, *d]))),
            _ => return self.item(depth),
        };
        self.cursor.skip(size);
        let cached = if initial < 0x20 { value <= 256 } else { value < 5 };
        if cached {
            Ok(())
        } else {
            self.charge(cost::INT)
        }
    }

    /// Walks the item at the cursor by its head.
    fn item(&mut self, depth: usize) -> Result<(), Stop> {
        let at = self.cursor.offset();
        match self.cursor.head()? {
            Head::Uint(n) if n <= 256 => Ok(()),
            Head::Uint(n) => self.charge(int_cost(u128::from(n))),
            Head::Nint(n) if n < 5 => Ok(()),
            Head::Nint(n) => self.charge(int_cost(u128::from(n) + 1)),
            Head::Bytes(len) => {
                let (n, chunks) = self.cursor.skip_string(2, len)?;
                match (len, n) {
                    (Some(_), 0 | 1) => Ok(()),
                    _ => self.charge(bytes_cost(n) + chunks * cost::CHUNK),
                }
            }
            Head::Text(len) => {
                let (n, chunks) = self.cursor.skip_string(3, len)?;
                match (len, n) {
                    (Some(_), 0 | 1) => Ok(()),
                    _ => self.charge(str_cost(n) + chunks * cost::CHUNK),
                }
            }
            Head::Array(len) => {
                let depth = enter(depth, at)?;
                self.charge(cost::LIST)?;
                self.items(len, depth, cost::SLOT).map(|_| ())
            }
            Head::Map(len) => {
                let depth = enter(depth, at)?;
                self.map(len, depth)
            }
            Head::Tag(tag) => {
                let depth = enter(depth, at)?;
                self.tagged(tag, depth)
            }
            Head::Float(_) => self.charge(cost::FLOAT),
            Head::Bool(_) | Head::Null => Ok(()),
            Head::Break => Err(Stop::Malformed),
        }
    }

    /// The items of an array whose head said `len`, each charged `slot` on
    /// top of itself; returns how many there were.
    fn items(&mut self, len: Option<u64>, depth: usize, slot: u64) -> Result<u64, Stop> {
        match len {
            Some(n) => {
                self.cursor.check_count(n, 1, "an array")?;
                self.charge(n * slot)?;
                for _ in 0..n {
                    self.next(depth)?;
                }
                Ok(n)
            }
            None => {
                let mut count = 0;
                while !self.cursor.take_break("an indefinite-length array")? {
                    self.charge(slot)?;
                    self.next(depth)?;
                    count += 1;
                }
                Ok(count)
            }
        }
    }

    /// A map: its table is charged for `str` keys when its head gives its
    /// length, and the difference at its first key of another type.
    fn map(&mut self, len: Option<u64>, depth: usize) -> Result<(), Stop> {
        let mut str_keys = true;
        match len {
            Some(n) => {
                self.cursor.check_count(n, 2, "a map")?;
                self.charge(dict_cost(n, true))?;
                for _ in 0..n {
                    if str_keys && self.cursor.peek("a map")? >> 5 != 3 {
                        str_keys = false;
                        self.charge(dict_cost(n, false) - dict_cost(n, true))?;
                    }
                    self.next(depth)?;
                    self.next(depth)?;
                }
                Ok(())
            }
            None => {
                let mut count = 0;
                while !self.cursor.take_break("an indefinite-length map")? {
                    str_keys &= self.cursor.peek("a map")? >> 5 == 3;
                    self.next(depth)?;
                    self.next(depth)?;
                    count += 1;
                }
                self.charge(dict_cost(count, str_keys))
            }
        }
    }

    /// The head of the array that is the content of a tag; `depth` counts
    /// the tag.
    fn array_head(&mut self, tag: u64, depth: usize) -> Result<(Option<u64>, usize), Stop> {
        self.cursor.expect_content(4, tag)?;
        let at = self.cursor.offset();
        match self.cursor.head()? {
            Head::Array(len) => Ok((len, enter(depth, at)?)),
            _ => Err(Stop::Malformed),
        }
    }

    /// The length of the byte string that is the content of a tag, and its
    /// number of chunks.
    fn bytes_content(&mut self, tag: u64) -> Result<(u64, u64), Stop> {
        self.cursor.expect_content(2, tag)?;
        match self.cursor.head()? {
            Head::Bytes(len) => Ok(self.cursor.skip_string(2, len)?),
            _ => Err(Stop::Malformed),
        }
    }

    /// A tagged item; `depth` counts the tag.
    fn tagged(&mut self, tag: u64, depth: usize) -> Result<(), Stop> {
        match tag {
            tags::TUPLE => {
                let (len, depth) = self.array_head(tag, depth)?;
                if len != Some(0) {
                    self.charge(cost::TUPLE)?;
                }
                self.items(len, depth, cost::SLOT).map(|_| ())
            }
            tags::SET | tags::FROZENSET => {
                let (len, depth) = self.array_head(tag, depth)?;
                if let Some(n) = len {
                    self.cursor.check_count(n, 1, "an array")?;
                    self.charge(set_cost(n))?;
                }
                let n = self.items(len, depth, 0)?;
                if len.is_none() {
                    self.charge(set_cost(n))?;
                }
                Ok(())
            }
            tags::COMPLEX => {
                if let Some(skip) = complex_shape(self.cursor.rest()) {
                    self.cursor.skip(skip);
                    self.charge(cost::COMPLEX)
                } else {
                    // not two floats: the decoder makes the array, then refuses it
                    self.cursor.expect_content(4, tag)?;
                    self.item(depth)?;
                    self.charge(cost::COMPLEX)
                }
            }
            tags::POS_BIGNUM | tags::NEG_BIGNUM => {
                let (n, chunks) = self.bytes_content(tag)?;
                self.charge(bignum_cost(n) + chunks * cost::CHUNK)
            }
            tags::BYTEARRAY => {
                let (n, chunks) = self.bytes_content(tag)?;
                let buffer = if n == 0 { 0 } else { round16(n + 1) };
                self.charge(cost::BYTEARRAY + buffer + chunks * cost::CHUNK)
            }
            tags::SURROGATE_STR => {
                let (n, chunks) = self.bytes_content(tag)?;
                // the str, and the bytes it is decoded from
                self.charge(str_cost(n) + bytes_cost(n) + chunks * cost::CHUNK)
            }
            tags::PLAIN => {
                self.cursor.expect_block()?;
                let Head::Bytes(len) = self.cursor.head()? else {
                    return Err(Stop::Malformed);
                };
                let at = self.cursor.offset();
                let block = self.cursor.bytes(len)?;
                let mut cost = PlainCost {
                    total: self.total,
                    budget: self.budget,
                };
                match plain::walk(&block, depth, &mut cost) {
                    Ok(()) => {
                        self.total = cost.total;
                        Ok(())
                    }
                    Err(PlainStop::Over) => Err(Stop::Over(at)),
                    Err(PlainStop::Malformed(_)) => Err(Stop::Malformed),
                }
            }
            _ => {
                self.next(depth)?;
                self.charge(cost::HOOK)
            }
        }
    }
}

/// Checks a plain-data block's shape, whatever its cost (the value
/// model's check, value.rs); `depth` is where its content sits.
pub fn check_plain(block: &[u8], depth: usize) -> Result<(), plain::Refused> {
    let mut cost = PlainCost {
        total: 0,
        budget: u64::MAX,
    };
    match plain::walk(block, depth, &mut cost) {
        Err(PlainStop::Malformed(refused)) => Err(refused),
        _ => Ok(()),
    }
}

/// The cost of the values of a plain-data block (protocol/plain.rs), in
/// the same table as their CBOR encoding; a str or bytes of up to one byte,
/// ints -5..=256, None, True, False and the empty tuple are cached.
struct PlainCost {
    total: u64,
    budget: u64,
}

enum PlainStop {
    Over,
    Malformed(plain::Refused),
}

impl From<plain::Refused> for PlainStop {
    fn from(refused: plain::Refused) -> Self {
        PlainStop::Malformed(refused)
    }
}

impl PlainCost {
    fn charge(&mut self, n: u64) -> Result<(), PlainStop> {
        self.total = self.total.saturating_add(n);
        if self.total > self.budget {
            Err(PlainStop::Over)
        } else {
            Ok(())
        }
    }
}

impl plain::Sink for PlainCost {
    type Value = ();
    type Error = PlainStop;
    fn none(&mut self) -> Result<(), PlainStop> {
        Ok(())
    }
    fn bool(&mut self, _: bool) -> Result<(), PlainStop> {
        Ok(())
    }
    fn int(&mut self, n: i64) -> Result<(), PlainStop> {
        if (-5..=256).contains(&n) {
            Ok(())
        } else {
            self.charge(int_cost(u128::from(n.unsigned_abs())))
        }
    }
    fn long(&mut self, bytes: &[u8]) -> Result<(), PlainStop> {
        self.charge(bignum_cost(bytes.len() as u64))
    }
    fn float(&mut self, _: f64) -> Result<(), PlainStop> {
        self.charge(cost::FLOAT)
    }
    fn str(&mut self, utf8: &[u8], _: usize) -> Result<(), PlainStop> {
        match utf8.len() {
            0 | 1 => Ok(()),
            n => self.charge(str_cost(n as u64)),
        }
    }
    fn bytes(&mut self, data: &[u8]) -> Result<(), PlainStop> {
        match data.len() {
            0 | 1 => Ok(()),
            n => self.charge(bytes_cost(n as u64)),
        }
    }
    fn bytearray(&mut self, data: &[u8]) -> Result<(), PlainStop> {
        let n = data.len() as u64;
        let buffer = if n == 0 { 0 } else { round16(n + 1) };
        self.charge(cost::BYTEARRAY + buffer)
    }
    fn opened(&mut self, kind: u8) -> Result<(), PlainStop> {
        // the container's base cost now (an empty one's whole cost), the rest when it closes
        self.charge(match kind {
            plain::op::EMPTY_LIST => cost::LIST,
            plain::op::EMPTY_DICT => cost::DICT,
            _ => cost::SET,
        })
    }
    fn list(&mut self, items: Vec<()>) -> Result<(), PlainStop> {
        self.charge(cost::SLOT * items.len() as u64)
    }
    fn tuple(&mut self, items: Vec<()>) -> Result<(), PlainStop> {
        match items.len() {
            0 => Ok(()),
            n => self.charge(cost::TUPLE + cost::SLOT * n as u64),
        }
    }
    fn dict(&mut self, items: Vec<()>, str_keys: bool) -> Result<(), PlainStop> {
        self.charge(dict_cost(items.len() as u64 / 2, str_keys) - cost::DICT)
    }
    fn set(&mut self, items: Vec<()>, frozen: bool) -> Result<(), PlainStop> {
        // a set was opened (its base charged then); a frozenset is made whole
        let base = if frozen { 0 } else { cost::SET };
        self.charge(set_cost(items.len() as u64) - base)
    }
}

/// The number of bytes of a complex number's content when it has the shape
/// the encoders write: `0x82` and two floats of any width.
fn complex_shape(rest: &[u8]) -> Option<usize> {
    let width = |b: &u8| match b {
        0xf9 => Some(3),
        0xfa => Some(5),
        0xfb => Some(9),
        _ => None,
    };
    if rest.first() != Some(&0x82) {
        return None;
    }
    let re = width(rest.get(1)?)?;
    let im = width(rest.get(1 + re)?)?;
    (1 + re + im <= rest.len()).then_some(1 + re + im)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost_of(frame: &[u8]) -> u64 {
        match estimate(frame, u64::MAX) {
            Estimate::Within(n) => n,
            other => panic!("{other:?} for {frame:02x?}"),
        }
    }

    #[test]
    fn singletons_cost_only_their_slot() {
        for frame in [
            &b"\xf6"[..],
            b"\xf5",
            b"\x00",
            b"\x19\x01\x00",
            b"\x24",
            b"\x60",
            b"\x61a",
            b"\x40",
            b"\x41\x00",
            b"\xd9\x9c\x41\x80",
        ] {
            assert_eq!(cost_of(frame), 0, "{frame:02x?}");
        }
        assert_eq!(cost_of(b"\x83\xf6\x00\x61a"), cost::LIST + 3 * cost::SLOT);
    }

    #[test]
    fn the_table_matches_cpython() {
        assert_eq!(cost_of(b"\x19\x01\x01"), 32); // 257
        assert_eq!(cost_of(b"\x25"), 32); // -6
        assert_eq!(cost_of(b"\x1b\x10\x00\x00\x00\x00\x00\x00\x00"), 48); // 2**60
        assert_eq!(cost_of(b"\xf9\x3e\x00"), 32);
        assert_eq!(cost_of(b"\x62ab"), 48); // 'ab': 43 -> 48
        assert_eq!(cost_of(b"\x43abc"), 48); // b'abc': 36 -> 48
        assert_eq!(cost_of(b"\xa0"), 64);
        assert_eq!(cost_of(b"\xa1\x61a\x00"), 64 + 128); // {'a': 0}: 184 -> 192
        assert_eq!(cost_of(b"\xa1\x00\x00"), 64 + 160); // {0: 0}: 224
        assert_eq!(dict_cost(6, true), 64 + 208); // 272
        assert_eq!(dict_cost(1000, true), 64 + round16(26032 - 64));
        assert_eq!(dict_cost(1000, false), 64 + round16(36952 - 64));
        assert_eq!(set_cost(0), 224);
        assert_eq!(set_cost(4), 224);
        assert_eq!(set_cost(5), 224 + 32 * 16); // set(range(5)): 728
        assert_eq!(cost_of(b"\xd9\x9c\x41\x82\x00\x00"), 40 + 16);
        assert_eq!(cost_of(b"\xd9\x9c\x43\x82\xf9\x00\x00\xfb\0\0\0\0\0\0\0\0"), 32);
        assert_eq!(bignum_cost(9), round16(24 + 12));
    }

    #[test]
    fn the_fixed_table_agrees_with_the_heads() {
        for initial in 0..=255u8 {
            let (size, fixed) = FIXED[usize::from(initial)];
            if size == 0 {
                continue;
            }
            let mut frame = vec![initial];
            frame.resize(usize::from(size), b'a');
            let mut walk = Walk {
                cursor: Cursor::new(&frame),
                total: 0,
                budget: u64::MAX,
            };
            assert!(walk.item(0).is_ok(), "{initial:#04x}");
            assert_eq!(walk.cursor.offset(), usize::from(size), "{initial:#04x}");
            assert_eq!(walk.total, u64::from(fixed), "{initial:#04x}");
        }
    }

    #[test]
    fn over_budget_stops_at_the_container_that_passes_it() {
        // 1000 empty maps: the array's slots fit, the maps do not
        let mut frame = vec![0x99, 0x03, 0xe8];
        frame.extend(std::iter::repeat_n(0xa0, 1000));
        let whole = cost_of(&frame);
        assert_eq!(whole, cost::LIST + 1000 * (cost::SLOT + cost::DICT));
        assert_eq!(estimate(&frame, whole), Estimate::Within(whole));
        match estimate(&frame, whole - 1) {
            Estimate::Over { offset } => assert_eq!(offset, frame.len()),
            other => panic!("{other:?}"),
        }
        match estimate(&frame, 10_000) {
            Estimate::Over { offset } => assert!(offset < 200, "{offset}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_frame_the_decoder_accepts_has_an_estimate() {
        use crate::protocol::value::Value;
        // streams of heads and bytes the decoders treat specially (xorshift, seeded)
        const BYTES: &[u8] = &[
            0x00, 0x01, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x20, 0x25, 0x38, 0x39, 0x40, 0x41, 0x42, 0x5f, 0x60,
            0x61, 0x62, 0x7f, 0x80, 0x81, 0x82, 0x9f, 0xa0, 0xa1, 0xbf, 0xc2, 0xc3, 0xd9, 0x01, 0x02, 0x9c,
            0x41, 0x42, 0x43, 0x44, 0x4b, 0xf4, 0xf6, 0xf9, 0xfb, 0xff, 0x61, 0x7a,
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut accepted = 0;
        for _ in 0..300_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize + 1;
            let frame: Vec<u8> = (0..len)
                .map(|i| BYTES[((state >> (i % 8 * 8)) as usize + i * 7) % BYTES.len()])
                .collect();
            if Value::decode(&frame).is_ok() {
                accepted += 1;
                assert!(
                    matches!(estimate(&frame, u64::MAX), Estimate::Within(_)),
                    "{frame:02x?}"
                );
            }
        }
        assert!(accepted > 1000, "only {accepted} frames were valid");
    }

    #[test]
    fn declared_lengths_are_not_charged_before_they_are_checked() {
        // an array of 2**32 items in 9 bytes is malformed, not over budget
        assert_eq!(estimate(b"\x9a\xff\xff\xff\xff\x00", 1000), Estimate::Malformed);
        assert_eq!(estimate(b"\xba\xff\xff\xff\xff\x00", 1000), Estimate::Malformed);
        assert_eq!(estimate(b"\x81", 1000), Estimate::Malformed);
        assert_eq!(estimate(b"\x80\x00", 1000), Estimate::Malformed);
    }

    #[test]
    fn a_plain_block_costs_what_its_value_costs_in_cbor_and_is_checked() {
        // [set(), set()]: PROTO 5, EMPTY_LIST, MARK, EMPTY_SET twice, APPENDS, STOP
        let block = [0x80, 5, b']', b'(', 0x8f, 0x8f, b'e', b'.'];
        let mut frame = vec![0xd9, 0x9c, 0x4e, 0x48]; // tag 40014, a byte string of 8
        frame.extend_from_slice(&block);
        let as_cbor = [0x82, 0xd9, 0x01, 0x02, 0x80, 0xd9, 0x01, 0x02, 0x80];
        assert_eq!(cost_of(&frame), cost_of(&as_cbor));
        assert_eq!(cost_of(&frame), cost::LIST + 2 * cost::SLOT + 2 * set_cost(0));
        assert!(matches!(estimate(&frame, 100), Estimate::Over { offset: 4 }));
        assert!(check_plain(&block, 1).is_ok());
        assert!(crate::protocol::value::Value::decode(&frame).is_ok());
        // a global and a call: refused by the walk, the estimate and the value model
        let evil = b"\x80\x05cos\nsystem\n(X\x02\x00\x00\x00idtR.";
        let refused = check_plain(evil, 1).unwrap_err();
        assert!(refused.what.contains("opcode 0x63 is not allowed"), "{refused}");
        let mut frame = vec![0xd9, 0x9c, 0x4e, 0x58, evil.len() as u8];
        frame.extend_from_slice(evil);
        assert_eq!(estimate(&frame, u64::MAX), Estimate::Malformed);
        assert!(crate::protocol::value::Value::decode(&frame).is_err());
    }
}
