//! The compiled codec: `cpy2py._host.dumps` and `cpy2py._host.loads`.
//!
//! Python objects to CBOR and back, directly, with the same behaviour and
//! byte-identical output as the pure-Python codec in
//! guest-python/cpy2py/protocol/codec_py.py (docs/protocol.md, "Values").
//! Floats are written by ciborium-ll, other heads directly (the same bytes);
//! frames are read with the cursor of the Rust value model, so both Rust
//! decoders apply the same wire rules.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::{c_char, c_int};
use std::sync::Mutex;

use ciborium_ll::{Encoder, Header};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyComplex, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PyMemoryView,
    PySet, PyString, PyTuple,
};
use pyo3::{ffi, intern, Borrowed};

use super::equal_hashes::EqualHashes;
use super::errors::protocol_error;
use super::host_calls::in_host;
use super::map_keys::{self, MapKeys};
use super::plain;
use super::received::Frame;
use super::surrogates::decode_passing_surrogates;
use crate::error::HostError;
use crate::protocol::budget::{self, Estimate};
use crate::protocol::frame::{SPARE_FROM, SPARE_LIMIT};
use crate::protocol::header::peek_header;
use crate::protocol::plain::{walk, Writer};
use crate::protocol::tags::{self, MAX_DEPTH};
use crate::protocol::value::{enter, unexpected_break, Cursor, Head};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dumps, m)?)?;
    m.add_function(wrap_pyfunction!(loads, m)?)?;
    m.add_function(wrap_pyfunction!(peek, m)?)?;
    Ok(())
}

/// `(kind, id, chain)` of a message frame, read without decoding it
/// (crate::protocol::header); the same as `codec_py.peek`.
#[pyfunction]
fn peek(frame: &Bound<'_, PyAny>) -> PyResult<(Option<u64>, Option<u64>, Option<u64>)> {
    let header = if let Ok(bytes) = frame.cast::<PyBytes>() {
        peek_header(bytes.as_bytes())
    } else if let Ok(received) = frame.cast::<Frame>() {
        // (the header comes before any byte string read apart)
        peek_header(received.get().body())
    } else if let Ok(array) = frame.cast::<PyByteArray>() {
        // SAFETY: read at once, with the GIL held and no Python code run meanwhile
        peek_header(unsafe { array.as_bytes() })
    } else {
        return Err(PyTypeError::new_err(format!(
            "peek() takes bytes, bytearray or a received Frame, not '{}'",
            type_name(frame)
        )));
    };
    Ok(header.map_or((None, None, None), |h| (h.kind, h.id, h.chain)))
}

/// `'module.Qualname'` of the type of `obj`, for error messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    let py = obj.py();
    let ty = obj.get_type();
    let attr = |name| {
        ty.getattr(name)
            .and_then(|v| v.str())
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".to_owned())
    };
    format!(
        "{}.{}",
        attr(intern!(py, "__module__")),
        attr(intern!(py, "__qualname__"))
    )
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Encodes `obj` as one CBOR data item (preferred serialization, definite
/// lengths). Objects whose exact type is not in the value model go to
/// `default(obj)`, which returns `(tag, value)`.
///
/// With `parts`, an encoding that holds byte strings (exact `bytes`) of at
/// least `PART_MIN` bytes comes as a tuple of `bytes` whose concatenation is
/// the encoding, those byte strings among them as they are: a transport
/// writes them with `writev`, and no large payload is copied into a frame.
///
/// With `plain`, a list, tuple, dict, set or frozenset of at least
/// `PLAIN_MIN` items that is plain data through and through goes as a
/// plain-data block (tag 40014, protocol/plain.rs), which a sandboxed guest
/// decodes with its C unpickler.
///
/// `sharing` says what becomes of a container (list, dict, tuple, set,
/// frozenset, bytearray), or a str or bytes of `SHARED_STRING_MIN` or more,
/// that the value holds more than once
/// (docs/protocol.md, "Shared values"): 0 written out each time (a tree),
/// 1 `cpy2py.errors.SharedParts` raised, 2 written once under tag 28 and
/// referred to with tag 29 after.
#[pyfunction]
#[pyo3(signature = (obj, default=None, parts=false, plain=false, sharing=0))]
fn dumps<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    default: Option<&Bound<'py, PyAny>>,
    parts: bool,
    plain: bool,
    sharing: u8,
) -> PyResult<Bound<'py, PyAny>> {
    let sharing = match sharing {
        0 => Sharing::Tree,
        1 => Sharing::Detect,
        2 => Sharing::Refs,
        _ => {
            return Err(PyValueError::new_err(format!(
                "sharing must be 0, 1 or 2, not {sharing}"
            )))
        }
    };
    // the buffer of the last large encoding, if no other encoding has it:
    // encoding a MiB into a fresh one costs hundreds of page faults
    let mut out = take_spare();
    out.clear();
    out.reserve(256);
    let mut encoder = Encode {
        out,
        default,
        cuts: parts.then(Vec::new),
        blocks: plain.then(Writer::default),
        sharing,
        seen: ByAddress::default(),
        in_blocks: plain::Met::default(),
        top: 0,
    };
    let encoded = encoder.item(obj, 0).and_then(|()| encoder.finish(py));
    keep_spare(encoder.out);
    encoded
}

/// The least length of a byte string that `dumps(..., parts=True)` leaves
/// out of the encoded buffer (smaller ones cost less to copy than to cut).
pub const PART_MIN: usize = 64 * 1024;

/// One buffer for the whole process (not one per thread: a pool of threads
/// would keep a large one each), taken and given back without waiting.
static SPARE_OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn take_spare() -> Vec<u8> {
    SPARE_OUT
        .try_lock()
        .map(|mut spare| std::mem::take(&mut *spare))
        .unwrap_or_default()
}

fn keep_spare(buffer: Vec<u8>) {
    if !(SPARE_FROM..=SPARE_LIMIT).contains(&buffer.capacity()) {
        return;
    }
    if let Ok(mut spare) = SPARE_OUT.try_lock() {
        if buffer.capacity() > spare.capacity() {
            *spare = buffer;
        }
    }
}

pyo3::import_exception!(cpy2py.errors, NestedTooDeep);
pyo3::import_exception!(cpy2py.errors, SharedParts);

fn too_deep() -> PyErr {
    NestedTooDeep::new_err(format!(
        "cannot encode a value nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)"
    ))
}

/// What `dumps` makes of a container that a value holds more than once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sharing {
    /// written out each time (a sandboxed guest's values are trees)
    Tree,
    /// `SharedParts` raised when one is met again
    Detect,
    /// written once under tag 28, referred to with tag 29 after
    Refs,
}

/// A container met while encoding with sharing on, kept alive until the
/// encoding ends (so that no other object takes its address meanwhile).
struct Seen<'py> {
    _kept: Bound<'py, PyAny>,
    /// its number among the shareable values of the frame
    index: u64,
    /// a tuple, set or frozenset still being written: the decoder makes it
    /// only after its items, so nothing inside it can refer to it
    open: bool,
}

/// Hashes a container's address for `Encode::seen`: addresses are distinct
/// and 16-byte aligned, so one multiply spreads them (std's SipHash cost
/// more than the rest of a look-up: 10k rows referenced elsewhere too took
/// 2.7x as long to encode as without looking them up).
#[derive(Default)]
pub(super) struct AddressHasher(u64);

const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15; // 2**64 / the golden ratio, odd

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(SPREAD);
        }
    }

    fn write_usize(&mut self, address: usize) {
        self.0 = (address as u64 >> 4).wrapping_mul(SPREAD);
    }
}

type ByAddress<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

/// How many references an unshared item has while the encoder writes it:
/// its container's and the encoder's own. More means it is referenced
/// elsewhere too, and may be held twice by the value.
pub(super) const UNSHARED_REFS: ffi::Py_ssize_t = 2;

/// Whether `obj` is a container whose identity a copy keeps (an empty
/// tuple or frozenset has none worth keeping: CPython shares them).
pub(super) fn shareable(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: Py_SIZE reads the size field of a live tuple or bytes
    let size = || unsafe { ffi::Py_SIZE(obj.as_ptr()) };
    obj.is_exact_instance_of::<PyList>()
        || obj.is_exact_instance_of::<PyDict>()
        || (obj.is_exact_instance_of::<PyTuple>() && size() > 0)
        || obj.is_exact_instance_of::<PySet>()
        || (obj.is_exact_instance_of::<PyFrozenSet>() && obj.len().is_ok_and(|n| n > 0))
        || obj.is_exact_instance_of::<PyByteArray>()
        || (obj.is_exact_instance_of::<PyBytes>() && size() >= SHARED_STRING_MIN)
        || (obj.is_exact_instance_of::<PyString>() && long_str(obj))
}

/// The length from which a str or bytes that a value holds more than once is
/// sent once and referred to after (as pickle does): a list of a thousand
/// references to one 1 MB str was 1 GB on the wire and in the receiver.
/// Shorter ones are not worth looking up (a reference is 3-5 bytes).
pub(super) const SHARED_STRING_MIN: ffi::Py_ssize_t = 64;

/// Whether an exact str is long enough to be shared (`SHARED_STRING_MIN`
/// characters).
fn long_str(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: a live exact str
    unsafe { ffi::PyUnicode_GetLength(obj.as_ptr()) >= SHARED_STRING_MIN }
}

fn changed_size(what: &str) -> PyErr {
    PyRuntimeError::new_err(format!("{what} changed size during encoding"))
}

struct Encode<'a, 'py> {
    out: Vec<u8>,
    default: Option<&'a Bound<'py, PyAny>>,
    /// with `parts`: the large byte strings left out of `out`, each with the
    /// length `out` had where it belongs
    cuts: Option<Vec<(usize, Bound<'py, PyBytes>)>>,
    /// with `plain`: where plain-data blocks are written before they are
    /// copied into `out` (a block's length comes first)
    blocks: Option<Writer>,
    sharing: Sharing,
    /// with sharing on: the containers met that may be shared, by address
    seen: ByAddress<Seen<'py>>,
    /// with sharing on and `plain`: the long str and bytes that blocks wrote
    /// (a later block holding one is refused: plain.rs `member`)
    in_blocks: plain::Met,
    /// with sharing on: the address of the value itself, if it is a container
    top: usize,
}

/// 2**64, exactly, as a double
const TWO_TO_THE_64: f64 = 18_446_744_073_709_551_616.0;

const UINT: u8 = 0;
const NINT: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;

impl<'py> Encode<'_, 'py> {
    /// The encoding: one `bytes`, or (with parts, and large byte strings
    /// left out) a tuple of the pieces of `out` and those byte strings.
    fn finish(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let cuts = match self.cuts.take() {
            Some(cuts) if !cuts.is_empty() => cuts,
            _ => return Ok(PyBytes::new(py, &self.out).into_any()),
        };
        let mut pieces = Vec::with_capacity(2 * cuts.len() + 1);
        let mut from = 0;
        for (at, bytes) in cuts {
            if at > from {
                pieces.push(PyBytes::new(py, &self.out[from..at]).into_any());
            }
            pieces.push(bytes.into_any());
            from = at;
        }
        if from < self.out.len() {
            pieces.push(PyBytes::new(py, &self.out[from..]).into_any());
        }
        Ok(PyTuple::new(py, pieces)?.into_any())
    }

    /// An exact `bytes`: with parts and large, its head here and the object
    /// itself among the parts (bytes cannot change: no copy is needed).
    fn bytes_object(&mut self, bytes: &Bound<'py, PyBytes>) {
        let data = bytes.as_bytes();
        if self.cuts.is_some() && data.len() >= PART_MIN {
            self.head(BYTES, data.len() as u64);
            let at = self.out.len();
            if let Some(cuts) = self.cuts.as_mut() {
                cuts.push((at, bytes.clone()));
            }
        } else {
            self.bytes(data);
        }
    }

    /// Appends the shortest head of major type `major` with argument `n`
    /// (preferred serialization). These are the bytes ciborium-ll's
    /// `Encoder` writes for the same `Header` (the shared vectors check
    /// both); written directly because heads are most of the work when
    /// encoding small items. The one-byte head is inlined everywhere.
    #[inline(always)]
    fn head(&mut self, major: u8, n: u64) {
        if n < 24 {
            self.out.push((major << 5) | n as u8);
        } else {
            self.long_head(major, n);
        }
    }

    /// A head with a 1-, 2-, 4- or 8-byte argument, appended at once
    /// (fixed lengths: the compiler writes them without calling memmove).
    fn long_head(&mut self, major: u8, n: u64) {
        let m = major << 5;
        if n <= 0xff {
            self.out.extend_from_slice(&[m | 24, n as u8]);
        } else if n <= 0xffff {
            let [a, b] = (n as u16).to_be_bytes();
            self.out.extend_from_slice(&[m | 25, a, b]);
        } else if n <= 0xffff_ffff {
            let [a, b, c, d] = (n as u32).to_be_bytes();
            self.out.extend_from_slice(&[m | 26, a, b, c, d]);
        } else {
            let [a, b, c, d, e, f, g, h] = n.to_be_bytes();
            self.out.extend_from_slice(&[m | 27, a, b, c, d, e, f, g, h]);
        }
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.head(BYTES, bytes.len() as u64);
        self.out.extend_from_slice(bytes);
    }

    /// The shortest of half, single and double precision that holds `x`
    /// exactly (ciborium-ll's `Header::Float` compares the bits after the
    /// round trip, so -0.0 keeps its sign); every NaN as `f9 7e 00`.
    fn float(&mut self, x: f64) -> PyResult<()> {
        if x.is_nan() {
            self.out.extend_from_slice(&[0xf9, 0x7e, 0x00]);
            Ok(())
        } else {
            Encoder::from(&mut self.out)
                .push(Header::Float(x))
                .map_err(|e| PyRuntimeError::new_err(format!("cannot write a CBOR float: {e}")))
        }
    }

    /// Encodes `obj` if it is a str, float, None, bool or an int of at
    /// most 64 bits (exact types); returns whether it was. Encoding these
    /// runs no Python code and makes no object the garbage collector
    /// tracks (so no collection runs a finalizer), so `obj` may be a
    /// reference borrowed from a container: nothing can drop it meanwhile.
    #[inline]
    fn scalar(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        if obj.is_exact_instance_of::<PyInt>() {
            return self.small_int(obj);
        } else if obj.is_exact_instance_of::<PyString>() {
            if self.sharing != Sharing::Tree && long_str(obj) {
                return Ok(false); // (item() looks it up: the value may hold it twice)
            }
            return self.text(obj); // (item() sends a str with surrogates tagged)
        } else if obj.is_exact_instance_of::<PyFloat>() {
            self.float(obj.cast_exact::<PyFloat>()?.value())?;
        } else if obj.is_none() {
            self.out.push(0xf6);
        } else if obj.is_exact_instance_of::<PyBool>() {
            self.out.push(if obj.cast_exact::<PyBool>()?.is_true() {
                0xf5
            } else {
                0xf4
            });
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Encodes a str as CBOR text; false (nothing written) if it holds lone
    /// surrogates, which text cannot (see `surrogate_str`).
    /// `obj` must not be borrowed from a container (short_utf8 may run a
    /// finalizer that drops it from there): `member` and `dict` take their
    /// own references to strs.
    #[inline]
    fn text(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        if let Some(utf8) = short_utf8(obj)? {
            self.head(TEXT, utf8.len() as u64);
            self.out.extend_from_slice(utf8);
            return Ok(true);
        }
        let (utf8, surrogates) = utf8_passing_surrogates(obj)?;
        if surrogates {
            return Ok(false);
        }
        self.head(TEXT, utf8.as_bytes().len() as u64);
        self.out.extend_from_slice(utf8.as_bytes());
        Ok(true)
    }

    /// Encodes an item of a container, given as a borrowed reference: a
    /// scalar as it is, anything else (whose encoding may run default(),
    /// which may change the container) through a reference of its own.
    /// Always inlined: it is the loop body of every container (a call per
    /// item was 25 more instructions per item of a 10k-int list).
    #[inline(always)]
    fn member(&mut self, obj: Borrowed<'_, 'py, PyAny>, depth: usize) -> PyResult<()> {
        if obj.is_exact_instance_of::<PyString>() {
            // (encoding a str may run a finalizer: `text`)
            return self.item(&obj.to_owned(), depth);
        }
        if self.scalar(&obj)? {
            return Ok(());
        }
        self.item(&obj.to_owned(), depth)
    }

    /// Encodes `obj`, enclosed by `depth` arrays, maps and tags.
    fn item(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        if self.scalar(obj)? {
            return Ok(());
        }
        // SAFETY: reads the reference count of a live object
        if self.sharing != Sharing::Tree
            && (depth == 0 || unsafe { ffi::Py_REFCNT(obj.as_ptr()) } > UNSHARED_REFS)
            && shareable(obj)
        {
            if depth > 0 {
                return self.shared_item(obj, depth);
            }
            // The value itself (a message), kept alive by the caller, is
            // never tagged: a frame starts with its array (codec.peek). Met
            // again only inside itself; most messages hold nothing else to
            // look up.
            self.top = obj.as_ptr() as usize;
        }
        self.compound(obj, depth)
    }

    /// Encodes a container that the value may hold more than once (with
    /// sharing on): the first time written (under tag 28 with `Refs`), after
    /// that a reference (or, with `Detect`, `SharedParts` raised).
    #[inline(never)]
    fn shared_item(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        if depth >= MAX_DEPTH
            && (obj.is_exact_instance_of::<PyString>() || obj.is_exact_instance_of::<PyBytes>())
        {
            // (a tag is one more level: at the deepest one a str or bytes is
            // written in full, as it was before strings were shared)
            return self.compound(obj, depth);
        }
        let address = obj.as_ptr() as usize;
        if address == self.top {
            return Err(if self.sharing == Sharing::Detect {
                SharedParts::new_err("the value holds itself")
            } else {
                NestedTooDeep::new_err(
                    "cannot encode a value that holds itself at its top level (send it inside a list)",
                )
            });
        }
        if let Some(seen) = self.seen.get(&address) {
            if self.sharing == Sharing::Detect {
                return Err(SharedParts::new_err(
                    "the value holds one of its parts more than once",
                ));
            }
            if seen.open {
                let kind = obj
                    .get_type()
                    .name()
                    .map_or_else(|_| "?".to_owned(), |n| n.to_string());
                return Err(NestedTooDeep::new_err(format!(
                    "cannot encode a {kind} that holds itself (through a list or dict): it cannot be \
                     referred to before it is complete"
                )));
            }
            if depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            let index = seen.index;
            self.head(TAG, tags::SHARED_REF);
            self.head(UINT, index);
            return Ok(());
        }
        let open = obj.is_exact_instance_of::<PyTuple>()
            || obj.is_exact_instance_of::<PySet>()
            || obj.is_exact_instance_of::<PyFrozenSet>();
        let index = self.seen.len() as u64;
        self.seen.insert(
            address,
            Seen {
                _kept: obj.clone(),
                index,
                open,
            },
        );
        if self.sharing == Sharing::Detect {
            return self.compound(obj, depth);
        }
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.head(TAG, tags::SHAREABLE);
        self.compound(obj, depth + 1)?;
        if let Some(seen) = self.seen.get_mut(&address) {
            seen.open = false;
        }
        Ok(())
    }

    /// Encodes `obj`, which is not a scalar, as it is (no reference to it).
    fn compound(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        // (a large plain container goes as a block when blocks are wanted)
        if self.blocks.is_some() && plain::worth_a_block(obj) && self.block(obj, depth)? {
            Ok(())
        } else if obj.is_exact_instance_of::<PyInt>() {
            self.big_int(obj, depth)
        } else if obj.is_exact_instance_of::<PyList>() {
            self.list(obj.cast_exact::<PyList>()?, depth)
        } else if obj.is_exact_instance_of::<PyTuple>() {
            let tuple = obj.cast_exact::<PyTuple>()?;
            if depth + 2 > MAX_DEPTH {
                return Err(too_deep());
            }
            self.head(TAG, tags::TUPLE);
            self.head(ARRAY, tuple.len() as u64);
            for i in 0..tuple.len() {
                // a tuple cannot change: its items live as long as it does
                self.member(tuple.get_borrowed_item(i)?, depth + 2)?;
            }
            Ok(())
        } else if obj.is_exact_instance_of::<PyDict>() {
            self.dict(obj.cast_exact::<PyDict>()?, depth)
        } else if obj.is_exact_instance_of::<PyBytes>() {
            self.bytes_object(obj.cast_exact::<PyBytes>()?);
            Ok(())
        } else if obj.is_exact_instance_of::<PySet>() {
            self.set(tags::SET, obj, obj.cast_exact::<PySet>()?.len(), depth)
        } else if obj.is_exact_instance_of::<PyFrozenSet>() {
            self.set(
                tags::FROZENSET,
                obj,
                obj.cast_exact::<PyFrozenSet>()?.len(),
                depth,
            )
        } else if obj.is_exact_instance_of::<PyComplex>() {
            let complex = obj.cast_exact::<PyComplex>()?;
            if depth + 2 > MAX_DEPTH {
                return Err(too_deep());
            }
            self.head(TAG, tags::COMPLEX);
            self.head(ARRAY, 2);
            self.float(complex.real())?;
            self.float(complex.imag())
        } else if obj.is_exact_instance_of::<PyByteArray>() {
            if depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            // a copy: nothing Python runs may resize it while we read
            let bytes = obj.cast_exact::<PyByteArray>()?.to_vec();
            self.head(TAG, tags::BYTEARRAY);
            self.bytes(&bytes);
            Ok(())
        } else if obj.is_exact_instance_of::<PyString>() {
            // (a long one that sharing looked up, or one with surrogates)
            if self.text(obj)? {
                return Ok(());
            }
            self.surrogate_str(obj, depth)
        } else {
            self.default(obj, depth)
        }
    }

    /// A str that `text` found no UTF-8 for (it holds lone surrogates, as
    /// `os.fsdecode` makes of a file name that is not UTF-8): its bytes with
    /// the surrogates passed through, as pickle writes them, under a tag.
    #[inline(never)]
    fn surrogate_str(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let (encoded, _) = utf8_passing_surrogates(obj)?;
        self.head(TAG, tags::SURROGATE_STR);
        self.bytes(encoded.as_bytes());
        Ok(())
    }

    /// Encodes `obj` as a plain-data block if it is plain data; returns
    /// whether it did.
    #[inline(never)]
    fn block(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<bool> {
        let Some(mut writer) = self.blocks.take() else {
            return Ok(false);
        };
        // (never the message itself: a request holds references, not plain data)
        let written = depth > 0
            && depth < MAX_DEPTH
            && plain::write(
                &mut writer,
                obj,
                MAX_DEPTH - depth - 1,
                (self.sharing != Sharing::Tree).then_some(&mut self.in_blocks),
            )?;
        if written {
            self.head(TAG, tags::PLAIN);
            self.bytes(&writer.out);
        }
        self.blocks = Some(writer);
        Ok(written)
    }

    /// Encodes an exact `int` that fits in 64 bits signed; returns whether
    /// it did (larger ones are left to `big_int`).
    #[inline]
    fn small_int(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        let mut overflow: c_int = 0;
        // SAFETY: `obj` is a live `int` (its exact type was checked) and we
        // are attached to the interpreter.
        let n = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
        if overflow != 0 {
            return Ok(false);
        }
        if n == -1 && PyErr::occurred(obj.py()) {
            return Err(PyErr::fetch(obj.py()));
        }
        // `!n` is `-1 - n`, the argument of a negative integer
        if n >= 0 {
            self.head(UINT, n as u64);
        } else {
            self.head(NINT, !n as u64);
        }
        Ok(true)
    }

    /// Encodes an exact `int` beyond 64 bits signed: up to 64 bits of
    /// magnitude as a plain integer, larger ones as a bignum.
    fn big_int(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        let py = obj.py();
        let mut overflow: c_int = 0;
        // SAFETY: `obj` is a live `int` and we are attached (as in
        // `small_int`, which found it beyond 64 bits signed): the sign of the
        // overflow is its own.
        unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
        let negative = overflow < 0;
        // `~obj` is `-1 - obj`
        let magnitude = if negative { obj.bitnot()? } else { obj.clone() };
        // Whether it fits in 64 bits, without the exception that asking for
        // a u64 that does not fit makes (half of a bignum's encoding): as a
        // double, rounded, it is below 2**64 only if it fits, at or above it
        // only if it does not or is within 2**11 of it.
        // SAFETY: as above; a magnitude too large for a double sets an
        // exception, cleared here: it is a bignum.
        let approximate = unsafe { ffi::PyLong_AsDouble(magnitude.as_ptr()) };
        if approximate == -1.0 {
            drop(PyErr::take(py));
        }
        let fits = if approximate < TWO_TO_THE_64 {
            approximate >= 0.0
        } else {
            approximate == TWO_TO_THE_64
        };
        if fits {
            if let Ok(n) = magnitude.extract::<u64>() {
                self.head(if negative { NINT } else { UINT }, n);
                return Ok(());
            }
        }
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        // its magnitude as hex text, "0x...": one C call, where `bit_length`
        // and `to_bytes` through method calls took twice as long (100k ints
        // of 2**100: 27 against 54 ms)
        // SAFETY: `magnitude` is a live int; a new reference or NULL
        let hex = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyNumber_ToBase(magnitude.as_ptr(), 16)) }?;
        let mut size: ffi::Py_ssize_t = 0;
        // SAFETY: `hex` is a str, held to the end of this function with its UTF-8
        let text = unsafe { PyUnicode_AsUTF8AndSize(hex.as_ptr(), &mut size) };
        if text.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: `size` bytes at `text`, alive while `hex` is
        let text = unsafe { std::slice::from_raw_parts(text.cast::<u8>(), size as usize) };
        self.head(
            TAG,
            if negative {
                tags::NEG_BIGNUM
            } else {
                tags::POS_BIGNUM
            },
        );
        self.bytes(&bytes_of_hex(text.strip_prefix(b"0x").unwrap_or(text)));
        Ok(())
    }

    fn list(&mut self, list: &Bound<'py, PyList>, depth: usize) -> PyResult<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let n = list.len();
        self.head(ARRAY, n as u64);
        let py = list.py();
        for i in 0..n {
            // SAFETY: `list` is a list and we are attached to the interpreter;
            // the borrowed item is used only until `member` takes a
            // reference of its own, before any Python code can run
            let item = unsafe { ffi::PyList_GetItem(list.as_ptr(), i as ffi::Py_ssize_t) };
            // SAFETY: as above; null (out of range) only after a default()
            // shortened the list
            let item = unsafe { Borrowed::from_ptr_or_err(py, item) }.map_err(|_| changed_size("list"))?;
            self.member(item, depth + 1)?;
        }
        if list.len() != n {
            return Err(changed_size("list"));
        }
        Ok(())
    }

    fn dict(&mut self, dict: &Bound<'py, PyDict>, depth: usize) -> PyResult<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let n = dict.len();
        self.head(MAP, n as u64);
        let py = dict.py();
        let mut count = 0;
        let mut pos: ffi::Py_ssize_t = 0;
        let mut key = std::ptr::null_mut();
        let mut value = std::ptr::null_mut();
        // the size is checked after each entry: default() may change it
        // SAFETY: `dict` is a dict and we are attached to the interpreter;
        // PyDict_Next stays within the entries even of a changed dict
        while count < n && unsafe { ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut value) } != 0 {
            // SAFETY: borrowed references to a live entry, non-null
            let (key, value) = unsafe { (Borrowed::from_ptr(py, key), Borrowed::from_ptr(py, value)) };
            // encoding the key may run Python code (default(); a finalizer
            // as a str is encoded: `text`), which may drop the entry
            let (key, value) = (key.to_owned(), value.to_owned());
            self.item(&key, depth + 1)?;
            self.item(&value, depth + 1)?;
            count += 1;
            if dict.len() != n {
                return Err(changed_size("dictionary"));
            }
        }
        if count != n {
            return Err(changed_size("dictionary"));
        }
        Ok(())
    }

    fn set(&mut self, tag: u64, set: &Bound<'py, PyAny>, n: usize, depth: usize) -> PyResult<()> {
        if depth + 2 > MAX_DEPTH {
            return Err(too_deep());
        }
        self.head(TAG, tag);
        self.head(ARRAY, n as u64);
        let mut count = 0;
        // Python's set iterator raises RuntimeError if default() resizes the set
        for item in set.try_iter()? {
            self.item(&item?, depth + 2)?;
            count += 1;
        }
        if count != n {
            return Err(changed_size("set"));
        }
        Ok(())
    }

    fn default(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> PyResult<()> {
        if let Some(default) = self.default {
            let py = obj.py();
            let result = default.call1((obj,))?;
            if !result.is(py.NotImplemented()) {
                let pair = match result.cast_exact::<PyTuple>() {
                    Ok(pair) if pair.len() == 2 => pair,
                    _ => {
                        return Err(PyTypeError::new_err(format!(
                            "default() must return a (tag, value) pair, not '{}'",
                            type_name(&result)
                        )))
                    }
                };
                let tag = pair.get_item(0)?;
                if !tag.is_instance_of::<PyInt>() {
                    return Err(PyTypeError::new_err(format!(
                        "default() returned a tag of type '{}', not an int",
                        type_name(&tag)
                    )));
                }
                let tag = tag.extract::<u64>().map_err(|_| {
                    let shown = tag
                        .str()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| "?".to_owned());
                    PyValueError::new_err(format!("default() returned tag {shown}, outside 0..2**64-1"))
                })?;
                if depth >= MAX_DEPTH {
                    return Err(too_deep());
                }
                self.head(TAG, tag);
                return self.item(&pair.get_item(1)?, depth + 1);
            }
        }
        Err(PyTypeError::new_err(format!(
            "cannot encode a value of type '{}': it is not part of the cpy2py value model and no default handles it",
            type_name(obj)
        )))
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Decodes exactly one CBOR data item from `data` (bytes, bytearray or
/// memoryview). Tags outside the value model go to `tag_hook(tag, value)`.
/// With `budget` (bytes; None: no limit), a frame whose estimated cost in
/// objects passes it is refused with `ProtocolError` before decoding
/// (`protocol::budget`).
#[pyfunction]
#[pyo3(signature = (data, tag_hook=None, budget=None))]
fn loads<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    tag_hook: Option<&Bound<'py, PyAny>>,
    budget: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let copy;
    let joined;
    let mut apart: &[(usize, Py<PyBytes>)] = &[];
    let input: &[u8] = if let Ok(bytes) = data.cast::<PyBytes>() {
        bytes.as_bytes()
    } else if let Ok(received) = data.cast::<Frame>() {
        // frozen, held by `data`: immutable while a tag hook runs Python code
        let received = received.get();
        if received.apart().is_empty() || budget.is_none_or(|b| b.is_none()) {
            apart = received.apart();
            received.body()
        } else {
            // the budget's walk reads the frame whole
            joined = received.joined(py);
            &joined
        }
    } else if data.is_instance_of::<PyByteArray>() || data.is_instance_of::<PyMemoryView>() {
        // a bytes copy: immutable while a tag hook runs Python code
        copy = py.get_type::<PyBytes>().call1((data,))?.cast_into::<PyBytes>()?;
        copy.as_bytes()
    } else {
        return Err(PyTypeError::new_err(format!(
            "loads() takes bytes, bytearray, memoryview or a received Frame, not '{}'",
            type_name(data)
        )));
    };
    let mut estimated = true;
    if let Some(budget) = budget.filter(|b| !b.is_none()) {
        let budget = budget_bytes(budget)?;
        // the walk reads immutable bytes only: other threads run meanwhile
        // (a 64 MiB frame takes tens of milliseconds)
        let verdict = if input.len() >= DETACH_WALK {
            in_host(py, || budget::estimate(input, budget))
        } else {
            budget::estimate(input, budget)
        };
        match verdict {
            Estimate::Within(_) => {}
            Estimate::Over { offset } => {
                return Err(protocol_error(py, budget::refusal(input.len(), budget, offset)))
            }
            Estimate::Malformed => estimated = false,
        }
    }
    if input.is_empty() {
        return Err(protocol_error(py, "empty input: expected one CBOR data item"));
    }
    let mut decoder = Decode {
        py,
        cursor: Cursor::new(input),
        apart,
        hook: tag_hook,
        guard: budget.is_some_and(|b| !b.is_none()),
        shared: Vec::new(),
        keys: (input.len() >= map_keys::FROM_FRAME_LEN).then(MapKeys::new),
    };
    let value = decoder.item(0)?;
    decoder.cursor.finish().map_err(|e| wire(py, e))?;
    if !estimated {
        // the estimate stopped at something the decoder accepted: never
        // expected, and refused rather than decoded without a budget
        return Err(protocol_error(
            py,
            format!(
                "a frame of {} bytes could not be checked against the decoding budget",
                input.len()
            ),
        ));
    }
    Ok(value)
}

/// Frames from this size up are walked for the budget without the GIL.
const DETACH_WALK: usize = 1 << 20;

/// The `budget` argument of `loads` in bytes: an int, at least 0 (ints
/// beyond 64 bits are no limit).
fn budget_bytes(budget: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !budget.is_instance_of::<PyInt>() || budget.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "budget must be an int (bytes) or None, not '{}'",
            type_name(budget)
        )));
    }
    if budget.lt(0)? {
        return Err(PyValueError::new_err(format!(
            "budget must be at least 0 bytes, not {}",
            budget.str()?
        )));
    }
    Ok(budget.extract::<u64>().unwrap_or(u64::MAX))
}

extern "C" {
    // (in the stable ABI from CPython 3.10, exported by every CPython 3; pyo3
    // declares it for abi3 builds from 3.10 only)
    fn PyUnicode_AsUTF8AndSize(unicode: *mut ffi::PyObject, size: *mut ffi::Py_ssize_t) -> *const c_char;
}

/// The bytes of a magnitude written as lowercase hex digits, most
/// significant first (an odd count: the first digit alone).
fn bytes_of_hex(digits: &[u8]) -> Vec<u8> {
    let value = |digit: u8| {
        if digit <= b'9' {
            digit - b'0'
        } else {
            digit - b'a' + 10
        }
    };
    let (first, rest) = digits.split_at(digits.len() % 2);
    let mut bytes = Vec::with_capacity(digits.len().div_ceil(2));
    bytes.extend(first.iter().map(|digit| value(*digit)));
    bytes.extend(
        rest.chunks_exact(2)
            .map(|pair| value(pair[0]) << 4 | value(pair[1])),
    );
    bytes
}

/// The int of a big-endian magnitude, read by CPython from hex text (one C
/// call, where `int.from_bytes` through a method call took a third longer;
/// hex is a power-of-two base, which `sys.set_int_max_str_digits` does not
/// limit).
fn int_of_magnitude<'py>(py: Python<'py>, magnitude: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = Vec::with_capacity(2 * magnitude.len() + 1);
    for byte in magnitude {
        text.push(DIGITS[usize::from(byte >> 4)]);
        text.push(DIGITS[usize::from(byte & 15)]);
    }
    text.push(0);
    // SAFETY: a NUL-terminated string of hex digits that lives; a new reference or NULL
    let n = unsafe { ffi::PyLong_FromString(text.as_ptr().cast(), std::ptr::null_mut(), 16) };
    // SAFETY: an owned reference from the call above, or NULL with an exception set
    unsafe { Bound::from_owned_ptr_or_err(py, n) }
}

/// Strs of at most this many characters are encoded by `short_utf8`.
const SHORT_STR: ffi::Py_ssize_t = 64;

/// The UTF-8 of a short str without a copy: CPython's own (an ASCII str's
/// characters as they are; for others, made once and kept with the str, at
/// most four bytes per character). None for a longer str, or one with lone
/// surrogates (their UnicodeEncodeError is cleared: `utf8_passing_surrogates`
/// then). Making that exception may start a collection, whose finalizers
/// run Python code: `str_obj` must be a reference of the caller's own.
/// Encoding short strs this way about halved a 10k-entry nested dict's
/// encoding (a new bytes object per key and value before).
fn short_utf8<'a>(str_obj: &'a Bound<'_, PyAny>) -> PyResult<Option<&'a [u8]>> {
    // SAFETY: `str_obj` is a str
    if unsafe { ffi::PyUnicode_GetLength(str_obj.as_ptr()) } > SHORT_STR {
        return Ok(None);
    }
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `str_obj` is a str; the UTF-8 lives as long as it does (held
    // by the caller for the returned lifetime)
    let data = unsafe { PyUnicode_AsUTF8AndSize(str_obj.as_ptr(), &mut size) };
    if data.is_null() {
        let py = str_obj.py();
        let err = PyErr::fetch(py);
        if err.is_instance_of::<pyo3::exceptions::PyUnicodeEncodeError>(py) {
            return Ok(None); // lone surrogates
        }
        return Err(err);
    }
    // SAFETY: `size` bytes at `data`, alive while `str_obj` is
    Ok(Some(unsafe {
        std::slice::from_raw_parts(data.cast::<u8>(), size as usize)
    }))
}

/// The str `obj` as UTF-8 with its lone surrogates passed through, and
/// whether it has any (as three bytes `ed a0..bf xx`, which strict UTF-8
/// never holds). CPython's strict encoder would fail on them, and the
/// exception object it made could start a collection whose finalizers free
/// `obj` where it is borrowed from a container (`scalar`); passing them makes
/// no object the collector tracks. With no encoding named, CPython takes its
/// UTF-8 encoder directly, as for a strict encoding, and looks the error
/// handler up only at a surrogate.
fn utf8_passing_surrogates<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyBytes>, bool)> {
    // SAFETY: `obj` is a str and the C string lives; a new reference or NULL
    let encoded =
        unsafe { ffi::PyUnicode_AsEncodedString(obj.as_ptr(), std::ptr::null(), c"surrogatepass".as_ptr()) };
    // SAFETY: an owned reference from the call above, or NULL with an exception set
    let encoded = unsafe { Bound::from_owned_ptr_or_err(obj.py(), encoded) }?.cast_into::<PyBytes>()?;
    let utf8 = encoded.as_bytes();
    // SAFETY: `obj` is a str
    let ascii = utf8.len() as ffi::Py_ssize_t == unsafe { ffi::PyUnicode_GetLength(obj.as_ptr()) };
    // (0xed leads few characters besides surrogates: memchr finds it at SIMD speed)
    let surrogates = !ascii
        && memchr::memchr_iter(0xed, utf8).any(|at| utf8.get(at + 1).is_some_and(|next| *next >= 0xa0));
    Ok((encoded, surrogates))
}

/// A text string's bytes as a str, checked by CPython's own decoder alone
/// (checking them in Rust first, then decoding, read them twice: most of a
/// map's keys).
fn decode_utf8<'py>(py: Python<'py>, bytes: &[u8], at: usize) -> PyResult<Bound<'py, PyAny>> {
    decode_utf8_with(py, bytes, c"strict").map_err(|err| invalid_utf8(py, err, "the text string", at))
}

/// `bytes` decoded as UTF-8 by CPython, with the error handler `errors`.
pub(super) fn decode_utf8_with<'py>(
    py: Python<'py>,
    bytes: &[u8],
    errors: &std::ffi::CStr,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: a pointer and length of live bytes; the result is a new reference or NULL
    let decoded = unsafe {
        ffi::PyUnicode_DecodeUTF8(
            bytes.as_ptr().cast(),
            bytes.len() as ffi::Py_ssize_t,
            errors.as_ptr(),
        )
    };
    // SAFETY: an owned reference from the call above, or NULL with an exception set
    unsafe { Bound::from_owned_ptr_or_err(py, decoded) }
}

/// A decoding error of CPython as the peer's protocol error (bad UTF-8 is
/// the peer's fault); any other error (memory) as it is.
fn invalid_utf8(py: Python<'_>, err: PyErr, what: &str, at: usize) -> PyErr {
    if err.is_instance_of::<pyo3::exceptions::PyUnicodeDecodeError>(py) {
        protocol_error(
            py,
            format!("invalid UTF-8 in {what} at offset {at}: {}", err.value(py)),
        )
    } else {
        err
    }
}

fn wire(py: Python<'_>, err: HostError) -> PyErr {
    protocol_error(py, err.to_string())
}

struct Decode<'a, 'py> {
    py: Python<'py>,
    cursor: Cursor<'a>,
    /// byte strings of a received `Frame` read apart from it, each with the
    /// offset where its content is missing from the input, in order
    apart: &'a [(usize, Py<PyBytes>)],
    hook: Option<&'a Bound<'py, PyAny>>,
    /// under a budget (a guest's frame): no dict or set with many keys of
    /// one hash (python/equal_hashes.rs), and no shared values (a guest's
    /// values are trees)
    guard: bool,
    /// the shareable values (tag 28) met so far, by number; None while one
    /// that cannot be referred to before it is complete is decoded
    shared: Vec<Option<Bound<'py, PyAny>>>,
    /// short text keys of maps, each decoded once (python/map_keys.rs);
    /// None for a small frame
    keys: Option<MapKeys<'a, 'py>>,
}

impl<'a, 'py> Decode<'a, 'py> {
    /// The byte string read apart whose content belongs where the cursor is
    /// (right after a head that declared `len` bytes), if there is one.
    fn apart_here(&mut self, len: Option<u64>) -> Option<Bound<'py, PyBytes>> {
        let (at, bytes) = self.apart.first()?;
        let bytes = bytes.bind(self.py);
        if *at != self.cursor.offset() || len != Some(bytes.as_bytes().len() as u64) {
            return None;
        }
        self.apart = &self.apart[1..];
        Some(bytes.clone())
    }

    /// Decodes the next item, enclosed by `depth` arrays, maps and tags.
    /// The most common items of large arrays and maps (an unsigned int below
    /// 2**32, a short text, a double, null) are taken where it is called,
    /// without a call of `any_item` (a call per item was a fifth of a
    /// 10k-int list's decoding, `perf record`).
    #[inline(always)]
    fn item(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        if let Some(n) = self.cursor.small_uint() {
            return Ok(n.into_pyobject(self.py)?.into_any());
        }
        if let Some((bytes, at)) = self.cursor.short_text() {
            return decode_utf8(self.py, bytes, at);
        }
        if let Some(x) = self.cursor.double() {
            return Ok(PyFloat::new(self.py, x).into_any());
        }
        if self.cursor.null() {
            return Ok(self.py.None().into_bound(self.py));
        }
        self.any_item(depth)
    }

    /// `item` for anything but its inline cases.
    #[inline(never)]
    fn any_item(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let at = self.cursor.offset();
        let head = self.cursor.head().map_err(|e| wire(py, e))?;
        Ok(match head {
            Head::Uint(n) => n.into_pyobject(py)?.into_any(),
            Head::Nint(n) => match i64::try_from(n) {
                Ok(n) => (-1 - n).into_pyobject(py)?.into_any(),
                Err(_) => (-1 - i128::from(n)).into_pyobject(py)?.into_any(),
            },
            Head::Bytes(len) => match self.apart_here(len) {
                Some(bytes) => bytes.into_any(),
                None => PyBytes::new(py, &self.cursor.bytes(len).map_err(|e| wire(py, e))?).into_any(),
            },
            Head::Text(Some(n)) => {
                let text_at = self.cursor.offset();
                let bytes = self.cursor.text_bytes(n).map_err(|e| wire(py, e))?;
                decode_utf8(py, bytes, text_at)?
            }
            Head::Text(None) => {
                PyString::new(py, &self.cursor.text(None).map_err(|e| wire(py, e))?).into_any()
            }
            Head::Array(len) => {
                let depth = enter(depth, at).map_err(|e| wire(py, e))?;
                PyList::new(py, self.items(len, depth)?)?.into_any()
            }
            Head::Map(len) => {
                let depth = enter(depth, at).map_err(|e| wire(py, e))?;
                self.map(len, depth)?.into_any()
            }
            Head::Tag(tag) => {
                let depth = enter(depth, at).map_err(|e| wire(py, e))?;
                self.tagged(tag, depth)?
            }
            Head::Float(x) => PyFloat::new(py, x).into_any(),
            Head::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
            Head::Null => py.None().into_bound(py),
            Head::Break => return Err(wire(py, unexpected_break(at))),
        })
    }

    /// The items of an array whose head said `len`.
    fn items(&mut self, len: Option<u64>, depth: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let py = self.py;
        match len {
            Some(n) => {
                let n = self
                    .cursor
                    .check_count(n, 1, "an array")
                    .map_err(|e| wire(py, e))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.item(depth)?);
                }
                Ok(items)
            }
            None => {
                let mut items = Vec::new();
                while !self
                    .cursor
                    .take_break("an indefinite-length array")
                    .map_err(|e| wire(py, e))?
                {
                    items.push(self.item(depth)?);
                }
                Ok(items)
            }
        }
    }

    fn map(&mut self, len: Option<u64>, depth: usize) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(self.py);
        self.fill_map(&dict, len, depth)?;
        Ok(dict)
    }

    /// Decodes the entries of a map whose head said `len` into `dict`.
    fn fill_map(&mut self, dict: &Bound<'py, PyDict>, len: Option<u64>, depth: usize) -> PyResult<()> {
        let py = self.py;
        let mut equal = EqualHashes::default();
        let mut left = match len {
            Some(n) => Some(self.cursor.check_count(n, 2, "a map").map_err(|e| wire(py, e))?),
            None => None,
        };
        loop {
            match left.as_mut() {
                Some(0) => return Ok(()),
                Some(n) => *n -= 1,
                None if self
                    .cursor
                    .take_break("an indefinite-length map")
                    .map_err(|e| wire(py, e))? =>
                {
                    return Ok(())
                }
                None => {}
            }
            let key = self.key(depth)?;
            let value = self.item(depth)?;
            if self.guard {
                equal.check(&key)?;
            }
            dict.set_item(&key, value).map_err(|e| {
                if e.is_instance_of::<PyTypeError>(py) {
                    protocol_error(py, format!("unhashable map key of type '{}'", type_name(&key)))
                } else {
                    e
                }
            })?;
        }
    }

    /// A map's key: a short text from the frame's table of keys, if it has one.
    #[inline(always)]
    fn key(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        if let Some(keys) = self.keys.as_mut() {
            if let Some((bytes, at)) = self.cursor.short_text() {
                let py = self.py;
                return match keys.get_or_decode(bytes, || decode_utf8(py, bytes, at)) {
                    Some(key) => key,
                    None => {
                        self.keys = None; // (few keys repeat in this frame)
                        decode_utf8(py, bytes, at)
                    }
                };
            }
        }
        self.item(depth)
    }

    /// The items of the array that is the content of a tag (already checked
    /// to be an array).
    fn array_content(&mut self, depth: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let py = self.py;
        let at = self.cursor.offset();
        match self.cursor.head().map_err(|e| wire(py, e))? {
            Head::Array(len) => {
                let depth = enter(depth, at).map_err(|e| wire(py, e))?;
                self.items(len, depth)
            }
            _ => Err(protocol_error(py, format!("expected an array at offset {at}"))),
        }
    }

    /// The content of a byte string that is the content of a tag (already
    /// checked to be a byte string).
    fn bytes_content(&mut self) -> PyResult<std::borrow::Cow<'_, [u8]>> {
        let py = self.py;
        let at = self.cursor.offset();
        match self.cursor.head().map_err(|e| wire(py, e))? {
            Head::Bytes(len) => match self.apart_here(len) {
                Some(bytes) => Ok(std::borrow::Cow::Owned(bytes.as_bytes().to_vec())),
                None => self.cursor.bytes(len).map_err(|e| wire(py, e)),
            },
            _ => Err(protocol_error(
                py,
                format!("expected a byte string at offset {at}"),
            )),
        }
    }

    /// The content of a tag 28 (`depth` counts the tag), numbered as the
    /// next shareable value. A list or dict is numbered before its items
    /// are decoded, so that they may refer to it (a value that holds
    /// itself); anything else once it is made.
    fn shareable(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let number = self.shared.len();
        self.shared.push(None);
        let major = self
            .cursor
            .peek_inside(|| format!("tag {}", tags::SHAREABLE))
            .map_err(|e| wire(py, e))?
            >> 5;
        let at = self.cursor.offset();
        let value = match major {
            4 | 5 => {
                let head = self.cursor.head().map_err(|e| wire(py, e))?;
                let depth = enter(depth, at).map_err(|e| wire(py, e))?;
                match head {
                    Head::Array(len) => {
                        let list = PyList::empty(py);
                        self.shared[number] = Some(list.clone().into_any());
                        for item in self.items(len, depth)? {
                            list.append(item)?;
                        }
                        list.into_any()
                    }
                    Head::Map(len) => {
                        let dict = PyDict::new(py);
                        self.shared[number] = Some(dict.clone().into_any());
                        self.fill_map(&dict, len, depth)?;
                        dict.into_any()
                    }
                    _ => unreachable!("the major type was peeked"),
                }
            }
            _ => self.item(depth)?,
        };
        self.shared[number] = Some(value.clone());
        Ok(value)
    }

    /// A tagged item; `depth` counts the tag. Never inlined: the rare
    /// path, kept out of the loops of arrays and maps.
    #[inline(never)]
    fn tagged(&mut self, tag: u64, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let content = |cursor: &Cursor<'_>, major| cursor.expect_content(major, tag).map_err(|e| wire(py, e));
        match tag {
            tags::TUPLE | tags::SET | tags::FROZENSET => {
                content(&self.cursor, 4)?;
                let items = self.array_content(depth)?;
                let unhashable = |e: PyErr| {
                    if !e.is_instance_of::<PyTypeError>(py) {
                        return e;
                    }
                    match items.iter().find(|item| item.hash().is_err()) {
                        Some(bad) => {
                            protocol_error(py, format!("unhashable set item of type '{}'", type_name(bad)))
                        }
                        None => e,
                    }
                };
                if tag != tags::TUPLE {
                    EqualHashes::check_all(self.guard, &items)?;
                }
                Ok(match tag {
                    tags::TUPLE => PyTuple::new(py, &items)?.into_any(),
                    tags::SET => PySet::new(py, &items).map_err(unhashable)?.into_any(),
                    _ => PyFrozenSet::new(py, &items).map_err(unhashable)?.into_any(),
                })
            }
            tags::POS_BIGNUM | tags::NEG_BIGNUM => {
                content(&self.cursor, 2)?;
                let magnitude = self.bytes_content()?;
                let first = magnitude.iter().position(|b| *b != 0).unwrap_or(magnitude.len());
                let significant = &magnitude[first..];
                let negative = tag == tags::NEG_BIGNUM;
                if significant.len() <= 8 {
                    let mut n = [0u8; 8];
                    n[8 - significant.len()..].copy_from_slice(significant);
                    let n = u64::from_be_bytes(n);
                    return Ok(if negative {
                        (-1 - i128::from(n)).into_pyobject(py)?.into_any()
                    } else {
                        n.into_pyobject(py)?.into_any()
                    });
                }
                let n = int_of_magnitude(py, significant)?;
                // `~n` is `-1 - n`
                if negative {
                    n.bitnot()
                } else {
                    Ok(n)
                }
            }
            tags::COMPLEX => {
                content(&self.cursor, 4)?;
                match &self.array_content(depth)?[..] {
                    [re, im]
                        if re.is_exact_instance_of::<PyFloat>() && im.is_exact_instance_of::<PyFloat>() =>
                    {
                        Ok(PyComplex::from_doubles(py, re.extract()?, im.extract()?).into_any())
                    }
                    _ => Err(protocol_error(
                        py,
                        format!("tag {} (complex) must hold an array of two floats", tags::COMPLEX),
                    )),
                }
            }
            tags::BYTEARRAY => {
                content(&self.cursor, 2)?;
                Ok(PyByteArray::new(py, &self.bytes_content()?).into_any())
            }
            tags::SURROGATE_STR => {
                content(&self.cursor, 2)?;
                let at = self.cursor.offset();
                let utf8 = self.bytes_content()?;
                decode_passing_surrogates(py, &utf8)
                    .map_err(|err| invalid_utf8(py, err, "a str with surrogates (tag 40015)", at))
            }
            tags::SHAREABLE | tags::SHARED_REF if self.guard => Err(protocol_error(
                py,
                format!(
                    "tag {tag} (a shared value) in a frame from a sandboxed guest, whose values \
                     are trees"
                ),
            )),
            tags::SHAREABLE => self.shareable(depth),
            tags::SHARED_REF => {
                content(&self.cursor, 0)?;
                let at = self.cursor.offset();
                let Head::Uint(n) = self.cursor.head().map_err(|e| wire(py, e))? else {
                    unreachable!("the content was checked to be an unsigned int")
                };
                match usize::try_from(n).ok().and_then(|n| self.shared.get(n)) {
                    Some(Some(value)) => Ok(value.clone()),
                    Some(None) => Err(protocol_error(
                        py,
                        format!(
                            "tag {tag} at offset {at} refers to shared value {n} from inside it, \
                             which is a tuple, set or frozenset made only once its items are"
                        ),
                    )),
                    None => Err(protocol_error(
                        py,
                        format!(
                            "tag {tag} at offset {at} refers to shared value {n}, but only {} came before it",
                            self.shared.len()
                        ),
                    )),
                }
            }
            tags::PLAIN => {
                self.cursor.expect_block().map_err(|e| wire(py, e))?;
                let guard = self.guard;
                let block = self.bytes_content()?;
                walk(&block, depth, &mut plain::Build { py, guard })
            }
            _ => match self.hook {
                None => Err(protocol_error(py, format!("unknown CBOR tag {tag}"))),
                Some(hook) => {
                    let value = self.item(depth)?;
                    hook.call1((tag, value))
                }
            },
        }
    }
}
