//! Plain-data blocks (tag 40014) between Python objects and bytes: the
//! compiled codec's side of protocol/plain.rs. [`Build`] makes the objects
//! of a block the walk accepted; [`write`] writes a value as a block when
//! it is plain data through and through.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::os::raw::c_int;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
};
use pyo3::{ffi, intern};

use super::codec::decode_utf8_with;
use super::codec::{shareable, AddressHasher, UNSHARED_REFS};
use super::equal_hashes::EqualHashes;
use super::errors::ProtocolError;
use super::surrogates::decode_passing_surrogates;
use crate::protocol::plain::{op, Refused, Sink, Writer};
use crate::protocol::tags::MAX_DEPTH;

/// The least number of items of a list, tuple, dict, set or frozenset that
/// `dumps(..., plain=True)` tries as a block: in the guest, encoding and
/// decoding 8 ints as a block took 10 us against 20 us as CBOR, 8 dict
/// entries 10 against 27 (docs/protocol.md, "Plain-data blocks").
pub const PLAIN_MIN: usize = 8;

/// How many items go between a mark and the opcode that takes them (as
/// CPython's pickler batches them): the walk's stack stays short.
const BATCH: usize = 1000;

impl From<Refused> for PyErr {
    fn from(refused: Refused) -> PyErr {
        if refused.too_deep {
            PyValueError::new_err(format!(
                "cannot decode a value nested deeper than {MAX_DEPTH} levels (MAX_DEPTH), \
                 sent in a plain-data block"
            ))
        } else {
            ProtocolError::new_err(refused.to_string())
        }
    }
}

/// Makes the Python objects of a block; with `guard` (a guest's frame), no
/// dict or set with many keys of one hash (python/equal_hashes.rs).
pub struct Build<'py> {
    pub py: Python<'py>,
    pub guard: bool,
}

fn unhashable(py: Python<'_>, err: PyErr, what: &str, items: &[Bound<'_, PyAny>]) -> PyErr {
    if !err.is_instance_of::<PyTypeError>(py) {
        return err;
    }
    match items.iter().find(|item| item.hash().is_err()) {
        Some(bad) => ProtocolError::new_err(format!(
            "unhashable {what} of type '{}' in a plain-data block",
            bad.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )),
        None => err,
    }
}

impl<'py> Sink for Build<'py> {
    type Value = Bound<'py, PyAny>;
    type Error = PyErr;

    fn none(&mut self) -> PyResult<Self::Value> {
        Ok(self.py.None().into_bound(self.py))
    }
    fn bool(&mut self, b: bool) -> PyResult<Self::Value> {
        Ok(PyBool::new(self.py, b).to_owned().into_any())
    }
    fn int(&mut self, n: i64) -> PyResult<Self::Value> {
        Ok(n.into_pyobject(self.py)?.into_any())
    }
    fn long(&mut self, bytes: &[u8]) -> PyResult<Self::Value> {
        let py = self.py;
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "signed"), true)?;
        py.get_type::<PyInt>().call_method(
            intern!(py, "from_bytes"),
            (PyBytes::new(py, bytes), intern!(py, "little")),
            Some(&kwargs),
        )
    }
    fn float(&mut self, x: f64) -> PyResult<Self::Value> {
        Ok(PyFloat::new(self.py, x).into_any())
    }
    fn str(&mut self, utf8: &[u8], at: usize) -> PyResult<Self::Value> {
        let decoded = decode_utf8_with(self.py, utf8, c"strict").or_else(|err| {
            if err.is_instance_of::<pyo3::exceptions::PyUnicodeDecodeError>(self.py) {
                // lone surrogates as pickle writes them (tag 40015 in CBOR)
                decode_passing_surrogates(self.py, utf8)
            } else {
                Err(err)
            }
        });
        decoded.map_err(|err| {
            if !err.is_instance_of::<pyo3::exceptions::PyUnicodeDecodeError>(self.py) {
                err
            } else {
                ProtocolError::new_err(format!(
                    "invalid UTF-8 in a str at offset {at} of a plain-data block: {}",
                    err.value(self.py)
                ))
            }
        })
    }
    fn bytes(&mut self, data: &[u8]) -> PyResult<Self::Value> {
        Ok(PyBytes::new(self.py, data).into_any())
    }
    fn bytearray(&mut self, data: &[u8]) -> PyResult<Self::Value> {
        Ok(PyByteArray::new(self.py, data).into_any())
    }
    fn list(&mut self, items: Vec<Self::Value>) -> PyResult<Self::Value> {
        Ok(PyList::new(self.py, items)?.into_any())
    }
    fn tuple(&mut self, items: Vec<Self::Value>) -> PyResult<Self::Value> {
        Ok(PyTuple::new(self.py, items)?.into_any())
    }
    fn dict(&mut self, items: Vec<Self::Value>, _: bool) -> PyResult<Self::Value> {
        let dict = PyDict::new(self.py);
        let mut equal = EqualHashes::default();
        for pair in items.chunks_exact(2) {
            if self.guard {
                equal.check(&pair[0])?;
            }
            dict.set_item(&pair[0], &pair[1])
                .map_err(|e| unhashable(self.py, e, "dict key", &pair[..1]))?;
        }
        Ok(dict.into_any())
    }
    fn set(&mut self, items: Vec<Self::Value>, frozen: bool) -> PyResult<Self::Value> {
        let py = self.py;
        EqualHashes::check_all(self.guard, &items)?;
        Ok(if frozen {
            PyFrozenSet::new(py, &items)
                .map_err(|e| unhashable(py, e, "frozenset item", &items))?
                .into_any()
        } else {
            PySet::new(py, &items)
                .map_err(|e| unhashable(py, e, "set item", &items))?
                .into_any()
        })
    }
}

/// Whether `obj` is a container worth trying as a block.
pub fn worth_a_block(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: Py_SIZE reads the size field of a live object of a sized type
    let sized = |obj: &Bound<'_, PyAny>| unsafe { ffi::Py_SIZE(obj.as_ptr()) } as usize >= PLAIN_MIN;
    if obj.is_exact_instance_of::<PyList>() || obj.is_exact_instance_of::<PyTuple>() {
        sized(obj)
    } else if obj.is_exact_instance_of::<PyDict>()
        || obj.is_exact_instance_of::<PySet>()
        || obj.is_exact_instance_of::<PyFrozenSet>()
    {
        obj.len().is_ok_and(|n| n >= PLAIN_MIN)
    } else {
        false
    }
}

/// Long str and bytes (`shareable`) that something else references too, by
/// address.
pub type Met = HashSet<usize, BuildHasherDefault<AddressHasher>>;

/// With sharing on, the long str and bytes written in earlier blocks of the
/// encoding and met in this one.
struct Shared<'a> {
    earlier: &'a mut Met,
    now: Met,
}

/// What a block's walk keeps of shared parts (None: sharing off).
type Sharing<'s, 'a> = &'s mut Option<Shared<'a>>;

/// Writes `obj` as a whole block into `w` (which it clears first) if it is
/// plain data through and through, nested at most `room` levels (counted as
/// CBOR would); `Ok(false)` if it is not: the caller encodes it as CBOR.
/// With `in_blocks` (the encoding keeps shared parts: the long str and
/// bytes its earlier blocks wrote), also when a container inside may be
/// held twice, or a long str or bytes was written before: a block is
/// written as a tree, and what it writes is added to `in_blocks`.
pub fn write(
    w: &mut Writer,
    obj: &Bound<'_, PyAny>,
    room: usize,
    in_blocks: Option<&mut Met>,
) -> PyResult<bool> {
    w.out.clear();
    w.start();
    let mut shared = in_blocks.map(|earlier| Shared {
        earlier,
        now: Met::default(),
    });
    if !value(w, obj, room, &mut shared)? {
        return Ok(false);
    }
    if let Some(Shared { earlier, now }) = shared {
        earlier.extend(now);
    }
    w.end();
    Ok(true)
}

/// An item inside the block: refused (the block is not written) if, with
/// sharing on, it is a container that may be held twice (the block would
/// hold copies), or a long str or bytes met in this block or written in an
/// earlier one (`[s] * 1000` of a 1 MB `s` would be a GB, in one block or
/// in a thousand): the CBOR around writes it once and refers to it after.
/// A long str held elsewhere too, met once, goes in the block.
fn member(w: &mut Writer, item: &Bound<'_, PyAny>, room: usize, shared: Sharing<'_, '_>) -> PyResult<bool> {
    if let Some(shared) = shared {
        // SAFETY: reads the reference count of a live object
        if unsafe { ffi::Py_REFCNT(item.as_ptr()) } > UNSHARED_REFS && shareable(item) {
            let text = item.is_exact_instance_of::<PyString>() || item.is_exact_instance_of::<PyBytes>();
            let address = item.as_ptr() as usize;
            // (an address reused by another object after a default() freed one
            // can only refuse a block more: the CBOR is right either way)
            if !text || shared.earlier.contains(&address) || !shared.now.insert(address) {
                return Ok(false);
            }
        }
    }
    value(w, item, room, shared)
}

fn value(w: &mut Writer, obj: &Bound<'_, PyAny>, room: usize, shared: Sharing<'_, '_>) -> PyResult<bool> {
    let py = obj.py();
    if obj.is_exact_instance_of::<PyInt>() {
        let mut overflow: c_int = 0;
        // SAFETY: a live exact int, attached to the interpreter
        let n = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
        if overflow == 0 {
            if n == -1 && PyErr::occurred(py) {
                return Err(PyErr::fetch(py));
            }
            w.int(n);
        } else {
            let bits: usize = obj.call_method0(intern!(py, "bit_length"))?.extract()?;
            let kwargs = PyDict::new(py);
            kwargs.set_item(intern!(py, "signed"), true)?;
            let bytes = obj.call_method(
                intern!(py, "to_bytes"),
                (bits / 8 + 1, intern!(py, "little")),
                Some(&kwargs),
            )?;
            w.long(bytes.cast::<PyBytes>()?.as_bytes());
        }
    } else if obj.is_exact_instance_of::<PyString>() {
        let s = obj.cast_exact::<PyString>()?;
        match s.encode_utf8() {
            Ok(utf8) => w.str(utf8.as_bytes()),
            // lone surrogates: passed through, as pickle writes them
            Err(_) => w.str(
                s.call_method1(intern!(py, "encode"), ("utf-8", "surrogatepass"))?
                    .cast::<PyBytes>()?
                    .as_bytes(),
            ),
        }
    } else if obj.is_exact_instance_of::<PyFloat>() {
        w.float(obj.cast_exact::<PyFloat>()?.value());
    } else if obj.is_none() {
        w.op(op::NONE);
    } else if obj.is_exact_instance_of::<PyBool>() {
        w.op(if obj.is_truthy()? {
            op::NEWTRUE
        } else {
            op::NEWFALSE
        });
    } else if obj.is_exact_instance_of::<PyBytes>() {
        w.bytes(obj.cast_exact::<PyBytes>()?.as_bytes());
    } else if obj.is_exact_instance_of::<PyByteArray>() {
        w.bytearray(&obj.cast_exact::<PyByteArray>()?.to_vec());
    } else if obj.is_exact_instance_of::<PyList>() {
        if room < 1 {
            return Ok(false);
        }
        w.op(op::EMPTY_LIST);
        let list = obj.cast_exact::<PyList>()?;
        let items: Vec<Bound<'_, PyAny>> = list.iter().collect();
        return batches(w, &items, room - 1, op::APPENDS, shared);
    } else if obj.is_exact_instance_of::<PyTuple>() {
        if room < 2 {
            return Ok(false);
        }
        let tuple = obj.cast_exact::<PyTuple>()?;
        let n = tuple.len();
        if n == 0 {
            w.op(op::EMPTY_TUPLE);
            return Ok(true);
        }
        if n > 3 {
            w.op(op::MARK);
        }
        for item in tuple.iter() {
            if !member(w, &item, room - 2, shared)? {
                return Ok(false);
            }
        }
        w.op(match n {
            1 => op::TUPLE1,
            2 => op::TUPLE2,
            3 => op::TUPLE3,
            _ => op::TUPLE,
        });
    } else if obj.is_exact_instance_of::<PyDict>() {
        if room < 1 {
            return Ok(false);
        }
        w.op(op::EMPTY_DICT);
        let dict = obj.cast_exact::<PyDict>()?;
        let n = dict.len();
        let mut items = Vec::with_capacity(2 * n);
        let mut pos: ffi::Py_ssize_t = 0;
        let mut key = std::ptr::null_mut();
        let mut item = std::ptr::null_mut();
        // SAFETY: a live dict, attached to the interpreter; each entry is
        // taken as an owned reference before anything else runs
        while unsafe { ffi::PyDict_Next(dict.as_ptr(), &mut pos, &mut key, &mut item) } != 0 {
            // SAFETY: borrowed references to a live entry, non-null
            unsafe {
                items.push(Bound::from_borrowed_ptr(py, key));
                items.push(Bound::from_borrowed_ptr(py, item));
            }
        }
        return batches(w, &items, room - 1, op::SETITEMS, shared);
    } else if obj.is_exact_instance_of::<PySet>() || obj.is_exact_instance_of::<PyFrozenSet>() {
        if room < 2 {
            return Ok(false);
        }
        let items = obj.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        if obj.is_exact_instance_of::<PySet>() {
            w.op(op::EMPTY_SET);
            return batches(w, &items, room - 2, op::ADDITEMS, shared);
        }
        w.op(op::MARK);
        for item in &items {
            if !member(w, item, room - 2, shared)? {
                return Ok(false);
            }
        }
        w.op(op::FROZENSET);
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// Items after the container's opcode, a mark and `take` per batch (for
/// SETITEMS, `items` holds keys and values in turn).
fn batches(
    w: &mut Writer,
    items: &[Bound<'_, PyAny>],
    room: usize,
    take: u8,
    shared: Sharing<'_, '_>,
) -> PyResult<bool> {
    let per = if take == op::SETITEMS { 2 * BATCH } else { BATCH };
    for batch in items.chunks(per) {
        w.op(op::MARK);
        for item in batch {
            if !member(w, item, room, shared)? {
                return Ok(false);
            }
        }
        w.op(take);
    }
    Ok(true)
}
