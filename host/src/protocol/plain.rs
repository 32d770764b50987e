//! Plain-data blocks: tag 40014 (docs/protocol.md, "Plain-data blocks").
//!
//! A block is a byte string holding a pickle of plain data only, written
//! without a memo: what CPython's C pickler writes, with `fast` set, for
//! None, bool, int, float, str, bytes, bytearray, list, tuple, dict, set and
//! frozenset. A sandboxed guest writes and reads blocks with the C pickle
//! module of its own CPython, several times faster than its pure-Python
//! CBOR codec; the host never unpickles them. [`walk`] reads a block opcode
//! by opcode and accepts only this subset (no name lookup, no call, no
//! memo, no persistent id), and hands each value to a [`Sink`]: the
//! decoding budget's estimate (budget.rs, which the value model's check in
//! value.rs uses too) and the compiled codec's decoder (python/codec.rs)
//! walk the same way, so they accept and refuse the same blocks.
//!
//! Without a memo every value is consumed exactly once, so a container is
//! built when it is consumed (appended to another, or the block's end), with
//! all its items: nothing can observe it before.

use super::tags::MAX_DEPTH;

/// The opcodes a block may hold (pickle's names; Lib/pickle.py).
pub mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINFLOAT: u8 = b'G';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const BINUNICODE8: u8 = 0x8d;
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const TUPLE: u8 = b't';
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
}

/// The pickle protocols a block may declare (4 and 5 have the opcodes above).
pub const PROTOCOLS: std::ops::RangeInclusive<u8> = 4..=5;

/// Why a block was refused: what, and where in the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub offset: usize,
    pub what: String,
    /// well-formed, but nested deeper than MAX_DEPTH: a guest's C pickler
    /// writes such values (it has no such limit), so this fails the value
    /// (a ValueError in the receiver), not the link
    pub too_deep: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "malformed plain-data block (tag 40014) at offset {} of the block: {}",
            self.offset, self.what
        )
    }
}

/// What a walk makes of the values of a block. Containers come with all
/// their items; `str_keys` says whether every key of a dict is a str.
pub trait Sink {
    type Value;
    /// Refusals of the walk itself become this error.
    type Error: From<Refused>;
    fn none(&mut self) -> Result<Self::Value, Self::Error>;
    fn bool(&mut self, b: bool) -> Result<Self::Value, Self::Error>;
    fn int(&mut self, n: i64) -> Result<Self::Value, Self::Error>;
    /// An int of more than 8 bytes, little-endian two's complement.
    fn long(&mut self, bytes: &[u8]) -> Result<Self::Value, Self::Error>;
    fn float(&mut self, x: f64) -> Result<Self::Value, Self::Error>;
    /// UTF-8, lone surrogates allowed (pickle writes str with "surrogatepass").
    fn str(&mut self, utf8: &[u8], at: usize) -> Result<Self::Value, Self::Error>;
    fn bytes(&mut self, b: &[u8]) -> Result<Self::Value, Self::Error>;
    fn bytearray(&mut self, b: &[u8]) -> Result<Self::Value, Self::Error>;
    fn list(&mut self, items: Vec<Self::Value>) -> Result<Self::Value, Self::Error>;
    fn tuple(&mut self, items: Vec<Self::Value>) -> Result<Self::Value, Self::Error>;
    /// `items`: keys and values in turn.
    fn dict(&mut self, items: Vec<Self::Value>, str_keys: bool) -> Result<Self::Value, Self::Error>;
    fn set(&mut self, items: Vec<Self::Value>, frozen: bool) -> Result<Self::Value, Self::Error>;
    /// An EMPTY_LIST, EMPTY_DICT or EMPTY_SET (`kind`) opened a container,
    /// which comes to `list`, `dict` or `set` when it is consumed: the
    /// budget charges its base cost here, so that containers a block opens
    /// and never closes are paid for as they are read.
    fn opened(&mut self, _kind: u8) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A value on the walk's stack: `height` is how many levels of nesting it
/// adds, counted as the CBOR encoding of the same value would (a list or
/// dict 1, a tuple or set 2: a tag around an array). An open container is
/// boxed, so that the budget's walk holds 16 bytes per value pending on its
/// stack (at most one per byte of the block), and nothing else.
enum Entry<V> {
    Mark,
    Done { value: V, height: u16, is_str: bool },
    Open(Box<Open<V>>),
}

/// A list, dict or set being filled; a dict's keys and values in turn.
struct Open<V> {
    kind: u8,
    items: Vec<V>,
    str_keys: bool,
    height: usize,
}

/// The values above a mark, their greatest height, and whether those at
/// even places (a SETITEMS's keys) are all str.
struct Marked<V> {
    items: Vec<V>,
    height: usize,
    keys_str: bool,
}

struct Walk<'a, 's, S: Sink> {
    block: &'a [u8],
    at: usize,
    /// the start of the opcode being read, for errors
    op_at: usize,
    /// levels a value may add: MAX_DEPTH less the depth of the block's content
    room: usize,
    stack: Vec<Entry<S::Value>>,
    sink: &'s mut S,
}

/// Walks `block`, whose content sits at `depth` (the levels enclosing it,
/// the tag included), and returns its one value as `sink` makes it.
pub fn walk<S: Sink>(block: &[u8], depth: usize, sink: &mut S) -> Result<S::Value, S::Error> {
    let mut walk = Walk {
        block,
        at: 0,
        op_at: 0,
        room: MAX_DEPTH.saturating_sub(depth),
        stack: Vec::new(),
        sink,
    };
    walk.run()
}

impl<'a, S: Sink> Walk<'a, '_, S> {
    fn refuse(&self, what: impl Into<String>) -> Refused {
        Refused {
            offset: self.op_at,
            what: what.into(),
            too_deep: false,
        }
    }

    fn too_deep(&self) -> Refused {
        Refused {
            too_deep: true,
            ..self.refuse(format!(
                "values nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)"
            ))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refused> {
        let block = self.block;
        let end = self.at.checked_add(n).filter(|end| *end <= block.len());
        match end {
            Some(end) => {
                let bytes = &block[self.at..end];
                self.at = end;
                Ok(bytes)
            }
            None => Err(self.refuse(format!(
                "the block ends inside an opcode that needs {n} more bytes"
            ))),
        }
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], Refused> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length of `width` bytes (1, 4 or 8, little-endian, unsigned).
    fn length(&mut self, width: usize) -> Result<usize, Refused> {
        let n = match width {
            1 => u64::from(self.le::<1>()?[0]),
            4 => u64::from(u32::from_le_bytes(self.le()?)),
            _ => u64::from_le_bytes(self.le()?),
        };
        // a length beyond what is left cannot be honest: refused before any use
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.block.len() - self.at)
            .ok_or_else(|| self.refuse(format!("a length of {n} bytes, beyond the block's end")))
    }

    fn push(&mut self, value: S::Value, height: usize, is_str: bool) {
        // heights are at most MAX_DEPTH (`nest`)
        self.stack.push(Entry::Done {
            value,
            height: height as u16,
            is_str,
        });
    }

    fn open(&mut self, kind: u8, levels: usize) -> Result<(), S::Error> {
        self.sink.opened(kind)?;
        let height = self.nest(levels, 0)?;
        self.stack.push(Entry::Open(Box::new(Open {
            kind,
            items: Vec::new(),
            str_keys: true,
            height,
        })));
        Ok(())
    }

    /// Makes a finished value of the entry on top of the stack, if it is a
    /// value: `(value, height, is_str)`.
    fn pop_value(&mut self) -> Result<(S::Value, usize, bool), S::Error> {
        match self.stack.pop() {
            Some(Entry::Done {
                value,
                height,
                is_str,
            }) => Ok((value, usize::from(height), is_str)),
            Some(Entry::Open(open)) => {
                let Open {
                    kind,
                    items,
                    str_keys,
                    height,
                } = *open;
                let value = match kind {
                    op::EMPTY_LIST => self.sink.list(items)?,
                    op::EMPTY_DICT => self.sink.dict(items, str_keys)?,
                    _ => self.sink.set(items, false)?,
                };
                Ok((value, height, false))
            }
            Some(Entry::Mark) => Err(self.refuse("a mark where a value was expected").into()),
            None => Err(self
                .refuse("an opcode that needs a value on an empty stack")
                .into()),
        }
    }

    /// The values above the topmost mark, in order, and their greatest
    /// height; the mark is removed.
    fn pop_to_mark(&mut self) -> Result<Marked<S::Value>, S::Error> {
        let Some(mark) = self.stack.iter().rposition(|e| matches!(e, Entry::Mark)) else {
            return Err(self
                .refuse("an opcode that needs a mark, with none on the stack")
                .into());
        };
        let count = self.stack.len() - mark - 1;
        let mut items = Vec::with_capacity(count);
        let mut keys_str = true;
        let mut height = 0;
        for left in (0..count).rev() {
            let (value, h, is_str) = self.pop_value()?;
            items.push(value);
            keys_str &= is_str || left % 2 == 1;
            height = height.max(h);
        }
        self.stack.pop(); // the mark
        items.reverse();
        Ok(Marked {
            items,
            height,
            keys_str,
        })
    }

    /// The height of a container `levels` deep around children of `child`
    /// height, checked against the room left.
    fn nest(&self, levels: usize, child: usize) -> Result<usize, Refused> {
        let height = child + levels;
        if height > self.room {
            return Err(self.too_deep());
        }
        Ok(height)
    }

    fn run(&mut self) -> Result<S::Value, S::Error> {
        match self.block {
            [op::PROTO, p, ..] if PROTOCOLS.contains(p) => self.at = 2,
            _ => {
                return Err(self
                    .refuse("a block starts with PROTO 4 or 5 (0x80 0x04 or 0x80 0x05)")
                    .into())
            }
        }
        loop {
            self.op_at = self.at;
            let Some(&code) = self.block.get(self.at) else {
                return Err(self.refuse("the block ends without STOP").into());
            };
            self.at += 1;
            match code {
                op::STOP => return self.stop(),
                op::FRAME => {
                    // framing only announces the size of what follows
                    self.length(8)?;
                }
                op::MARK => self.stack.push(Entry::Mark),
                op::NONE => {
                    let v = self.sink.none()?;
                    self.push(v, 0, false)
                }
                op::NEWTRUE | op::NEWFALSE => {
                    let v = self.sink.bool(code == op::NEWTRUE)?;
                    self.push(v, 0, false)
                }
                op::BININT1 => {
                    let n = self.le::<1>()?[0];
                    let v = self.sink.int(i64::from(n))?;
                    self.push(v, 0, false)
                }
                op::BININT2 => {
                    let n = u16::from_le_bytes(self.le()?);
                    let v = self.sink.int(i64::from(n))?;
                    self.push(v, 0, false)
                }
                op::BININT => {
                    let n = i32::from_le_bytes(self.le()?);
                    let v = self.sink.int(i64::from(n))?;
                    self.push(v, 0, false)
                }
                op::LONG1 | op::LONG4 => {
                    let len = if code == op::LONG1 {
                        self.length(1)?
                    } else {
                        let n = i32::from_le_bytes(self.le()?);
                        usize::try_from(n)
                            .ok()
                            .filter(|n| *n <= self.block.len() - self.at)
                            .ok_or_else(|| {
                                self.refuse(format!("LONG4 of {n} bytes, beyond the block's end"))
                            })?
                    };
                    let bytes = self.take(len)?;
                    let v = if len <= 8 {
                        // sign-extended from its last byte
                        let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                            0xff
                        } else {
                            0
                        };
                        let mut n = [fill; 8];
                        n[..len].copy_from_slice(bytes);
                        self.sink.int(i64::from_le_bytes(n))?
                    } else {
                        self.sink.long(bytes)?
                    };
                    self.push(v, 0, false)
                }
                op::BINFLOAT => {
                    let x = f64::from_be_bytes(self.le()?);
                    let v = self.sink.float(x)?;
                    self.push(v, 0, false)
                }
                op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                    let width = match code {
                        op::SHORT_BINUNICODE => 1,
                        op::BINUNICODE => 4,
                        _ => 8,
                    };
                    let len = self.length(width)?;
                    let text_at = self.at;
                    let utf8 = self.take(len)?;
                    let v = self.sink.str(utf8, text_at)?;
                    self.push(v, 0, true)
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let width = match code {
                        op::SHORT_BINBYTES => 1,
                        op::BINBYTES => 4,
                        _ => 8,
                    };
                    let len = self.length(width)?;
                    let data = self.take(len)?;
                    let v = if code == op::BYTEARRAY8 {
                        self.sink.bytearray(data)?
                    } else {
                        self.sink.bytes(data)?
                    };
                    self.push(v, 0, false)
                }
                op::EMPTY_LIST | op::EMPTY_DICT => self.open(code, 1)?,
                op::EMPTY_SET => self.open(code, 2)?,
                op::EMPTY_TUPLE => {
                    let v = self.sink.tuple(Vec::new())?;
                    let height = self.nest(2, 0)?;
                    self.push(v, height, false)
                }
                op::APPEND => {
                    let (value, h, _) = self.pop_value()?;
                    self.add_items(vec![value], h, false, code)?
                }
                op::SETITEM => {
                    let (value, hv, _) = self.pop_value()?;
                    let (key, hk, key_str) = self.pop_value()?;
                    self.add_items(vec![key, value], hk.max(hv), key_str, code)?
                }
                op::APPENDS | op::SETITEMS | op::ADDITEMS => {
                    let marked = self.pop_to_mark()?;
                    self.add_items(marked.items, marked.height, marked.keys_str, code)?
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(code - op::TUPLE1 + 1);
                    let mut items = Vec::with_capacity(n);
                    let mut child = 0;
                    for _ in 0..n {
                        let (value, h, _) = self.pop_value()?;
                        items.push(value);
                        child = child.max(h);
                    }
                    items.reverse();
                    let height = self.nest(2, child)?;
                    let v = self.sink.tuple(items)?;
                    self.push(v, height, false)
                }
                op::TUPLE | op::FROZENSET => {
                    let Marked {
                        items, height: child, ..
                    } = self.pop_to_mark()?;
                    let height = self.nest(2, child)?;
                    let v = if code == op::TUPLE {
                        self.sink.tuple(items)?
                    } else {
                        self.sink.set(items, true)?
                    };
                    self.push(v, height, false)
                }
                other => {
                    return Err(self
                        .refuse(format!(
                            "opcode 0x{other:02x} is not allowed: a block holds plain data only \
                             (no global, call, memo or persistent id)"
                        ))
                        .into())
                }
            }
        }
    }

    /// Adds `items` (for SETITEM(S): keys and values in turn, `keys_str`
    /// saying whether the keys are all str) to the container below them.
    fn add_items(
        &mut self,
        items: Vec<S::Value>,
        child: usize,
        keys_str: bool,
        code: u8,
    ) -> Result<(), S::Error> {
        let (wanted, levels, what) = match code {
            op::APPEND | op::APPENDS => (op::EMPTY_LIST, 1, "APPEND(S) with no list below its items"),
            op::ADDITEMS => (op::EMPTY_SET, 2, "ADDITEMS with no set below its items"),
            _ => (op::EMPTY_DICT, 1, "SETITEM(S) with no dict below its items"),
        };
        let room = self.room;
        let Some(Entry::Open(open)) = self
            .stack
            .last_mut()
            .filter(|e| matches!(e, Entry::Open(o) if o.kind == wanted))
        else {
            return Err(self.refuse(what).into());
        };
        if wanted == op::EMPTY_DICT {
            if items.len() % 2 != 0 {
                return Err(self.refuse("SETITEMS with a key and no value").into());
            }
            open.str_keys &= keys_str;
        }
        open.height = open.height.max(child + levels);
        let over = open.height > room;
        open.items.extend(items);
        if over {
            return Err(self.too_deep().into());
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<S::Value, S::Error> {
        if self.at != self.block.len() {
            return Err(self
                .refuse(format!("{} bytes after STOP", self.block.len() - self.at))
                .into());
        }
        if self.stack.len() != 1 {
            return Err(self
                .refuse(format!(
                    "STOP with {} entries on the stack, not one value",
                    self.stack.len()
                ))
                .into());
        }
        Ok(self.pop_value()?.0)
    }
}

/// Writes plain data as a block: the opcodes CPython's C pickler writes for
/// the same values with `fast` set, in one frame (the guest's unpickler
/// reads a block from a file object: without a frame, it makes a read call
/// per opcode, which took longer than the CBOR codec it replaces).
#[derive(Default)]
pub struct Writer {
    pub out: Vec<u8>,
}

/// The bytes before a block's first value: PROTO 5, then FRAME and its
/// length (filled in by [`Writer::end`]).
const HEADER: usize = 2 + 9;

impl Writer {
    pub fn start(&mut self) {
        self.out
            .extend_from_slice(&[op::PROTO, 5, op::FRAME, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    pub fn end(&mut self) {
        self.out.push(op::STOP);
        let framed = (self.out.len() - HEADER) as u64;
        self.out[3..HEADER].copy_from_slice(&framed.to_le_bytes());
    }
    pub fn op(&mut self, code: u8) {
        self.out.push(code);
    }
    pub fn int(&mut self, n: i64) {
        match n {
            0..=0xff => self.out.extend_from_slice(&[op::BININT1, n as u8]),
            0x100..=0xffff => {
                self.out.push(op::BININT2);
                self.out.extend_from_slice(&(n as u16).to_le_bytes());
            }
            _ if i32::try_from(n).is_ok() => {
                self.out.push(op::BININT);
                self.out.extend_from_slice(&(n as i32).to_le_bytes());
            }
            _ => {
                // the shortest two's complement that keeps the sign
                let bytes = n.to_le_bytes();
                let mut len = 8;
                while len > 1 {
                    let top = bytes[len - 1];
                    let next_sign = bytes[len - 2] & 0x80;
                    if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                        len -= 1;
                    } else {
                        break;
                    }
                }
                self.long(&bytes[..len]);
            }
        }
    }
    /// An int as little-endian two's complement bytes.
    pub fn long(&mut self, bytes: &[u8]) {
        if let Ok(len) = u8::try_from(bytes.len()) {
            self.out.extend_from_slice(&[op::LONG1, len]);
        } else {
            self.out.push(op::LONG4);
            self.out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(bytes);
    }
    pub fn float(&mut self, x: f64) {
        self.out.push(op::BINFLOAT);
        self.out.extend_from_slice(&x.to_be_bytes());
    }
    pub fn str(&mut self, utf8: &[u8]) {
        self.sized(utf8, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8);
    }
    pub fn bytes(&mut self, data: &[u8]) {
        self.sized(data, op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8);
    }
    pub fn bytearray(&mut self, data: &[u8]) {
        self.out.push(op::BYTEARRAY8);
        self.out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.out.extend_from_slice(data);
    }
    fn sized(&mut self, data: &[u8], short: u8, four: u8, eight: u8) {
        let len = data.len();
        if len < 0x100 {
            self.out.extend_from_slice(&[short, len as u8]);
        } else if let Ok(len) = u32::try_from(len) {
            self.out.push(four);
            self.out.extend_from_slice(&len.to_le_bytes());
        } else {
            self.out.push(eight);
            self.out.extend_from_slice(&(len as u64).to_le_bytes());
        }
        self.out.extend_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that renders values as text, to check what a walk makes.
    struct Show;

    impl Sink for Show {
        type Value = String;
        type Error = Refused;
        fn none(&mut self) -> Result<String, Refused> {
            Ok("None".into())
        }
        fn bool(&mut self, b: bool) -> Result<String, Refused> {
            Ok(if b { "True" } else { "False" }.into())
        }
        fn int(&mut self, n: i64) -> Result<String, Refused> {
            Ok(n.to_string())
        }
        fn long(&mut self, b: &[u8]) -> Result<String, Refused> {
            Ok(format!("long{b:02x?}"))
        }
        fn float(&mut self, x: f64) -> Result<String, Refused> {
            Ok(format!("{x:?}"))
        }
        fn str(&mut self, s: &[u8], _: usize) -> Result<String, Refused> {
            Ok(format!("{:?}", String::from_utf8_lossy(s)))
        }
        fn bytes(&mut self, b: &[u8]) -> Result<String, Refused> {
            Ok(format!("b{b:?}"))
        }
        fn bytearray(&mut self, b: &[u8]) -> Result<String, Refused> {
            Ok(format!("ba{b:?}"))
        }
        fn list(&mut self, items: Vec<String>) -> Result<String, Refused> {
            Ok(format!("[{}]", items.join(", ")))
        }
        fn tuple(&mut self, items: Vec<String>) -> Result<String, Refused> {
            Ok(format!("({})", items.join(", ")))
        }
        fn dict(&mut self, items: Vec<String>, str_keys: bool) -> Result<String, Refused> {
            let shown: Vec<String> = items
                .chunks(2)
                .map(|kv| format!("{}: {}", kv[0], kv[1]))
                .collect();
            Ok(format!(
                "{}{{{}}}",
                if str_keys { "s" } else { "" },
                shown.join(", ")
            ))
        }
        fn set(&mut self, items: Vec<String>, frozen: bool) -> Result<String, Refused> {
            Ok(format!(
                "{}{{{}}}",
                if frozen { "frozen" } else { "set" },
                items.join(", ")
            ))
        }
    }

    fn show(block: &[u8]) -> Result<String, Refused> {
        walk(block, 1, &mut Show)
    }

    fn block(body: &[u8]) -> Vec<u8> {
        let mut out = vec![op::PROTO, 5];
        out.extend_from_slice(body);
        out.push(op::STOP);
        out
    }

    // What CPython 3.11's C pickler writes with protocol 5 and `fast` set
    // (pickletools.dis), without its FRAME opcode.
    #[test]
    fn reads_what_the_c_pickler_writes() {
        // {'a': [1, 300, -2], 'b': (None, True, 1.5)}
        let body =
            [&b"}(\x8c\x01a](K\x01M\x2c\x01J\xfe\xff\xff\xffe\x8c\x01bN\x88G\x3f\xf8\0\0\0\0\0\0\x87u"[..]]
                .concat();
        assert_eq!(
            show(&block(&body)).unwrap(),
            "s{\"a\": [1, 300, -2], \"b\": (None, True, 1.5)}"
        );
        // {1: frozenset(), 2: {b'x'}} with a bytearray and a long
        let body =
            b"}(K\x01(\x91K\x02\x8f(C\x01x\x90K\x03\x96\x01\0\0\0\0\0\0\0yK\x04\x8a\x09\0\0\0\0\0\0\0\0\x01u";
        assert_eq!(
            show(&block(body)).unwrap(),
            "{1: frozen{}, 2: set{b[120]}, 3: ba[121], 4: long[00, 00, 00, 00, 00, 00, 00, 00, 01]}"
        );
    }

    #[test]
    fn a_pending_value_of_the_budgets_walk_takes_16_bytes() {
        assert_eq!(std::mem::size_of::<Entry<()>>(), 16);
    }

    #[test]
    fn frames_are_skipped() {
        let mut data = vec![op::PROTO, 5, op::FRAME];
        data.extend_from_slice(&3u64.to_le_bytes());
        data.extend_from_slice(&[op::BININT1, 7, op::STOP]);
        assert_eq!(show(&data).unwrap(), "7");
    }

    #[test]
    fn the_writer_writes_what_the_walk_reads() {
        let mut w = Writer::default();
        w.start();
        w.op(op::EMPTY_LIST);
        w.op(op::MARK);
        for n in [
            0,
            255,
            256,
            65535,
            65536,
            -1,
            i64::from(i32::MIN),
            1 << 40,
            -(1 << 40),
            i64::MIN,
            i64::MAX,
        ] {
            w.int(n);
        }
        w.float(-0.0);
        w.str("é".as_bytes());
        w.bytes(&[0; 300]);
        w.bytearray(b"z");
        w.long(&[0, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        w.op(op::APPENDS);
        w.end();
        let shown = show(&w.out).unwrap();
        assert!(shown.starts_with(
            "[0, 255, 256, 65535, 65536, -1, -2147483648, 1099511627776, -1099511627776, \
             -9223372036854775808, 9223372036854775807, -0.0, \"é\", b[0,"
        ));
        assert!(shown.ends_with("ba[122], long[00, 00, 00, 00, 00, 00, 00, 00, 80]]"));
    }

    #[test]
    fn refuses_what_is_not_plain_data() {
        // cos.system\n(S'id'\ntR.  (GLOBAL, a call)
        let refusal = show(&block(b"cos\nsystem\n(X\x02\0\0\0idtR")).unwrap_err();
        assert_eq!(refusal.offset, 2);
        assert!(refusal.what.contains("opcode 0x63 is not allowed"), "{refusal}");
        for body in [
            &b"]\x94"[..],                   // MEMOIZE
            b"]h\x00",                       // BINGET
            b"\x8c\x02os\x8c\x06system\x93", // STACK_GLOBAL
            b"X\x01\0\0\0x\x94K\x01Q",       // BINPERSID
            b"]2",                           // DUP
            b"K\x01\x82\x01",                // EXT1
        ] {
            assert!(show(&block(body)).is_err(), "{body:02x?}");
        }
    }

    #[test]
    fn refuses_broken_structure() {
        let cases: [(&[u8], &str); 10] = [
            (b"", "STOP with 0 entries"),
            (b"K\x01K\x02", "STOP with 2 entries"),
            (b"(", "a mark where a value"),
            (b"K\x01a", "APPEND(S) with no list"),
            (b"]K\x01K\x02s", "SETITEM(S) with no dict"),
            (b"}(K\x01u", "a key and no value"),
            (b"]K\x01e", "needs a mark"),
            (b"e", "needs a mark"),
            (b"\x85", "on an empty stack"),
            (b"X\xff\xff\xff\x7f", "beyond the block's end"),
        ];
        for (body, expected) in cases {
            let refusal = show(&block(body)).unwrap_err();
            assert!(refusal.what.contains(expected), "{body:02x?}: {refusal}");
        }
        assert!(show(&[op::PROTO, 3, op::NONE, op::STOP])
            .unwrap_err()
            .what
            .contains("PROTO 4 or 5"));
        assert!(show(&[op::PROTO, 5, op::NONE])
            .unwrap_err()
            .what
            .contains("without STOP"));
        assert!(show(&[op::PROTO, 5, op::NONE, op::STOP, 0])
            .unwrap_err()
            .what
            .contains("after STOP"));
        assert!(show(&[op::PROTO, 5, op::LONG4, 0xff, 0xff, 0xff, 0xff, op::STOP])
            .unwrap_err()
            .what
            .contains("LONG4 of -1 bytes"));
    }

    #[test]
    fn counts_depth_as_cbor_would() {
        // lists: one level each; a tuple or set two
        let nested = |n: usize, open: &[u8], close: &[u8]| {
            let mut body = Vec::new();
            for _ in 0..n {
                body.extend_from_slice(open);
            }
            body.push(op::NONE);
            for _ in 0..n {
                body.extend_from_slice(close);
            }
            block(&body)
        };
        // content at depth 1: 255 lists fit, 256 do not
        assert!(show(&nested(MAX_DEPTH - 1, b"]", b"a")).is_ok());
        let refusal = show(&nested(MAX_DEPTH, b"]", b"a")).unwrap_err();
        assert!(
            refusal.too_deep && refusal.what.contains("MAX_DEPTH"),
            "{refusal}"
        );
        assert!(!show(&block(b"e")).unwrap_err().too_deep);
        assert!(show(&nested(127, b"", b"\x85")).is_ok());
        assert!(show(&nested(128, b"", b"\x85"))
            .unwrap_err()
            .what
            .contains("MAX_DEPTH"));
        assert!(show(&nested(128, b"(", b"\x91"))
            .unwrap_err()
            .what
            .contains("MAX_DEPTH"));
        assert!(show(&nested(MAX_DEPTH, b"}N", b"s"))
            .unwrap_err()
            .what
            .contains("MAX_DEPTH"));
    }
}
