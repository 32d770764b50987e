//! Strs whose UTF-8 holds lone surrogates (protocol/surrogates.rs): the
//! content of tag 40015, a pickle's strs in a plain-data block. CPython's
//! decoder calls its `"surrogatepass"` error handler once per surrogate,
//! about half a microsecond each: a str of a latin-1 file read with
//! `surrogateescape` (a surrogate in every other char) came at about 2 MB/s.
//! Here its code points are taken in one pass and the str made from them.

use pyo3::ffi;
use pyo3::prelude::*;

use super::codec::decode_utf8_with;
use crate::protocol::surrogates::{split_passing_surrogates, Piece};

/// `utf8` decoded as `bytes.decode("utf-8", "surrogatepass")` does. What
/// that refuses is left to CPython's decoder, whose UnicodeDecodeError
/// names the bad byte.
pub fn decode_passing_surrogates<'py>(py: Python<'py>, utf8: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    // (a wchar_t of 4 bytes holds any code point: Linux and macOS)
    if std::mem::size_of::<libc::wchar_t>() == 4 {
        let mut points: Vec<u32> = Vec::with_capacity(utf8.len());
        let whole = split_passing_surrogates(utf8, |piece| match piece {
            Piece::Text(text) => points.extend(text.chars().map(u32::from)),
            Piece::Surrogate(point) => points.push(u32::from(point)),
        });
        if whole {
            // SAFETY: a pointer and length of live u32s, the size of wchar_t,
            // which CPython copies (a surrogate pair stays two code points, as
            // its decoder leaves it); a new reference or NULL
            let made = unsafe {
                ffi::PyUnicode_FromWideChar(points.as_ptr().cast(), points.len() as ffi::Py_ssize_t)
            };
            // SAFETY: an owned reference from the call above, or NULL with an exception set
            return unsafe { Bound::from_owned_ptr_or_err(py, made) };
        }
    }
    decode_utf8_with(py, utf8, c"surrogatepass")
}
