//! Large frames as received: `Frame`, which the codec reads in place, and
//! `read_frame`, which reads one with its large byte strings apart.
//!
//! A frame of 64 KiB or more is not copied into a `bytes` on its way to the
//! kernel (that copy and the page faults of a fresh buffer were a third of a
//! 1 MiB echo). When it is read here, each byte string of at least
//! `PART_MIN` bytes in it is read straight into a `bytes` of its own, and the
//! frame keeps the rest with a note of where each one was: decoding then
//! hands those objects out instead of copying their contents.

use std::io;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::codec::PART_MIN;
use super::errors::protocol_error;
use super::twin::NativeTwin;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Frame>()?;
    m.add_function(wrap_pyfunction!(read_frame, m)?)?;
    Ok(())
}

/// A large frame received from a twin (`NativeTwin.recv`, `read_frame`),
/// handed to the kernel as it was read: the codec (`loads`, `peek`) reads
/// it in place, `len()` is its length, and `bytes(frame)` a copy for
/// anything else (the limited API of Python 3.9 has no buffer protocol for
/// extension types).
#[pyclass(module = "cpy2py._host", frozen)]
pub struct Frame {
    /// the frame, without the contents of the byte strings in `apart`
    body: Vec<u8>,
    /// large byte strings read apart: where each one's content would be in
    /// `body` (right after its head), in order
    apart: Vec<(usize, Py<PyBytes>)>,
    /// the native twin whose reader gets the body back when the frame is
    /// dropped, for its next large frame (`read_frame`'s frames have none)
    twin: Option<Py<NativeTwin>>,
}

impl Frame {
    /// Frames from this many bytes on come as a `Frame`.
    pub const FROM: usize = 64 * 1024;

    /// A frame a native twin's reader read whole.
    pub fn received(body: Vec<u8>, twin: Py<NativeTwin>) -> Frame {
        Frame {
            body,
            apart: Vec::new(),
            twin: Some(twin),
        }
    }

    /// The frame's bytes without the contents of the byte strings read apart.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The byte strings read apart, each with its place in `body`.
    pub fn apart(&self) -> &[(usize, Py<PyBytes>)] {
        &self.apart
    }

    /// The whole frame, the byte strings read apart put back.
    pub fn joined(&self, py: Python<'_>) -> Vec<u8> {
        let mut whole = Vec::with_capacity(self.len(py));
        let mut from = 0;
        for (at, bytes) in &self.apart {
            whole.extend_from_slice(&self.body[from..*at]);
            whole.extend_from_slice(bytes.bind(py).as_bytes());
            from = *at;
        }
        whole.extend_from_slice(&self.body[from..]);
        whole
    }

    fn len(&self, py: Python<'_>) -> usize {
        self.body.len()
            + self
                .apart
                .iter()
                .map(|(_, b)| b.bind(py).as_bytes().len())
                .sum::<usize>()
    }
}

#[pymethods]
impl Frame {
    fn __len__(&self, py: Python<'_>) -> usize {
        self.len(py)
    }

    /// A copy of the whole frame, as `bytes`.
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.joined(py))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<cpy2py Frame of {} bytes, {} byte strings read apart>",
            self.len(py),
            self.apart.len()
        )
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(twin) = &self.twin {
            twin.get().0.recycle(std::mem::take(&mut self.body));
        }
    }
}

/// Reads the rest of a frame of `length` bytes from the blocking descriptor
/// `fd`, after `first`, the part of it read already, into a `Frame` whose
/// large byte strings are read apart (see the module). A CPython twin's
/// transport reads its large frames this way (protocol/transport.py; into a
/// bytearray, the codec would copy them again). Signal handlers run between
/// reads; a stream that ends first is a `ProtocolError`.
#[pyfunction]
fn read_frame<'py>(py: Python<'py>, fd: i32, first: &[u8], length: usize) -> PyResult<Bound<'py, Frame>> {
    if first.len() > length {
        return Err(PyValueError::new_err(format!(
            "read_frame: {} bytes read already of a frame of {length}",
            first.len()
        )));
    }
    let mut split = Split {
        body: Vec::with_capacity(length.min(READ_CHUNK).max(first.len())),
        apart: Vec::new(),
        scan: 0,
        consumed: first.len(),
        length,
        in_chunks: false,
    };
    split.body.extend_from_slice(first);
    loop {
        split.scan_heads(py, fd)?;
        if split.consumed == split.length {
            break;
        }
        let want = (split.length - split.consumed).min(READ_CHUNK);
        split.body.reserve(want);
        let spare = &mut split.body.spare_capacity_mut()[..want];
        let (at, room) = (spare.as_mut_ptr() as usize, spare.len());
        // SAFETY: reads into spare capacity of the body, which nothing else
        // touches meanwhile; only what was read is then counted in its length
        let got = read_into(py, fd, at, room)?;
        unsafe { split.body.set_len(split.body.len() + got) };
        split.consumed += got;
    }
    Bound::new(
        py,
        Frame {
            body: split.body,
            apart: split.apart,
            twin: None,
        },
    )
}

/// The most read into the body at a time: a large byte string's content
/// that comes with it is copied into its own `bytes` (at most this much).
const READ_CHUNK: usize = 64 * 1024;

/// One read of up to `room` bytes into the memory at `at`, with the GIL
/// released, going on after signals (their handlers run first). The caller
/// owns that memory and nothing else touches it meanwhile.
fn read_into(py: Python<'_>, fd: i32, at: usize, room: usize) -> PyResult<usize> {
    loop {
        // SAFETY: see above
        let got = py.detach(|| unsafe { libc::read(fd, at as *mut libc::c_void, room) });
        match got {
            0 => return Err(protocol_error(py, "the stream ended inside a frame")),
            n if n > 0 => return Ok(n as usize),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err.into());
                }
                py.check_signals()?;
            }
        }
    }
}

/// A frame being read: its heads are looked at in order (a flat walk: every
/// CBOR item is a head, strings are followed by their content), and a large
/// definite byte string whose content is not read yet is read apart.
struct Split {
    body: Vec<u8>,
    apart: Vec<(usize, Py<PyBytes>)>,
    /// where in `body` the next head starts
    scan: usize,
    /// bytes of the frame taken from the stream (in `body` or read apart)
    consumed: usize,
    length: usize,
    /// inside an indefinite-length string, whose chunks stay in the body
    /// (the decoder reads them together)
    in_chunks: bool,
}

impl Split {
    /// Looks at the heads in `body` from `scan` on, as far as they are read,
    /// reading large byte strings apart as it meets them.
    fn scan_heads(&mut self, py: Python<'_>, fd: i32) -> PyResult<()> {
        while let Some((head_len, major, argument)) = head_at(&self.body[self.scan..]) {
            let content = self.scan + head_len;
            match (major, argument) {
                (2 | 3, Some(n)) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let have = self.body.len() - content;
                    let left_in_frame = self.length - self.consumed + have;
                    if major == 2 && !self.in_chunks && n >= PART_MIN && n > have && n <= left_in_frame {
                        self.read_apart(py, fd, content, n)?;
                        self.scan = content; // the body goes on after the head
                    } else if n > have {
                        return Ok(()); // its content is not all read yet
                    } else {
                        self.scan = content + n;
                    }
                }
                (2 | 3, None) => {
                    self.in_chunks = true;
                    self.scan = content;
                }
                (7, None) => {
                    self.in_chunks = false; // a break
                    self.scan = content;
                }
                _ => self.scan = content,
            }
        }
        Ok(())
    }

    /// Reads the content of the byte string of `n` bytes whose head ends at
    /// `at` into a `bytes` of its own: what of it is in the body already,
    /// then the rest straight from the stream.
    fn read_apart(&mut self, py: Python<'_>, fd: i32, at: usize, n: usize) -> PyResult<()> {
        let have = self.body.len() - at;
        // SAFETY: a new bytes object of `n` bytes, filled below before anyone
        // else can see it (bytes are immutable once shared)
        let bytes: Bound<'_, PyBytes> = unsafe {
            let raw = ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as ffi::Py_ssize_t);
            Bound::from_owned_ptr_or_err(py, raw)?.cast_into_unchecked()
        };
        let start = unsafe { ffi::PyBytes_AsString(bytes.as_ptr()) } as usize;
        // SAFETY: `have` < n bytes into the new object's buffer
        unsafe { std::ptr::copy_nonoverlapping(self.body[at..].as_ptr(), start as *mut u8, have) };
        self.body.truncate(at);
        let mut filled = have;
        while filled < n {
            filled += read_into(py, fd, start + filled, n - filled)?;
        }
        self.consumed += n - have;
        self.apart.push((at, bytes.unbind()));
        Ok(())
    }
}

/// The head at the start of `data`: its length, major type and argument
/// (None for an indefinite length, or a break), or None if it is not all
/// there. A reserved head reads as a one-byte head: the decoder refuses it.
fn head_at(data: &[u8]) -> Option<(usize, u8, Option<u64>)> {
    let ib = *data.first()?;
    let (major, info) = (ib >> 5, ib & 0x1f);
    let width = match info {
        0..=23 => return Some((1, major, Some(u64::from(info)))),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return Some((1, major, None)),
    };
    let bytes = data.get(1..1 + width)?;
    let argument = bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    Some((1 + width, major, Some(argument)))
}
