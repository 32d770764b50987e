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
use super::host_calls::in_host;
use super::twin::NativeTwin;
use crate::error::HostError;
use crate::protocol::header::argument;

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
    let read = &mut |at: usize, room: usize| loop {
        // SAFETY: memory the split owns and nothing else touches meanwhile
        let got = in_host(py, || unsafe { libc::read(fd, at as *mut libc::c_void, room) });
        if got >= 0 {
            return Ok(got as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err.into());
        }
        py.check_signals()?;
    };
    let frame = Split::new(first, length).run(read, &mut |n| new_bytes(py, n))?;
    Bound::new(py, frame)
}

/// Reads the rest of a frame of `length` bytes from a native twin's
/// descriptor `fd` for `NativeTwin.recv`, with the GIL released and the
/// twin's reader lock held (nothing else reads the stream meanwhile): as
/// `read_frame`, taking the GIL only to make the byte strings read apart.
/// Reads interrupted by a signal go on without running its handler (the
/// reading thread holds its signals: a frame begun is read to its end, and
/// the handler runs after). `Ok(None)`: the stream ended inside the frame.
pub fn read_native_frame(
    fd: i32,
    first: Vec<u8>,
    length: usize,
    twin: Py<NativeTwin>,
) -> PyResult<Option<Frame>> {
    let mut ended = false;
    let read = &mut |at: usize, room: usize| loop {
        // SAFETY: memory the split owns and nothing else touches meanwhile
        let got = unsafe { libc::read(fd, at as *mut libc::c_void, room) };
        if got >= 0 {
            ended |= got == 0;
            return Ok(got as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err.into());
        }
    };
    let split = Split::new(&first, length).run(read, &mut |n| Python::attach(|py| new_bytes(py, n)));
    match split {
        Ok(mut frame) => {
            frame.twin = Some(twin);
            Ok(Some(frame))
        }
        Err(_) if ended => Ok(None),
        Err(err) => Err(err),
    }
}

/// A new `bytes` of `n` bytes, not yet filled, and the address of its
/// buffer. The caller fills it before anyone else can see the object.
fn new_bytes(py: Python<'_>, n: usize) -> PyResult<(Py<PyBytes>, usize)> {
    // SAFETY: a new object we own; bytes are immutable only once shared
    unsafe {
        let raw = ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as ffi::Py_ssize_t);
        let bytes: Bound<'_, PyBytes> = Bound::from_owned_ptr_or_err(py, raw)?.cast_into_unchecked();
        let start = ffi::PyBytes_AsString(bytes.as_ptr()) as usize;
        Ok((bytes.unbind(), start))
    }
}

/// The most read into the body at a time: a large byte string's content
/// that comes with it is copied into its own `bytes` (at most this much).
const READ_CHUNK: usize = 64 * 1024;

/// Reads into memory the split owns: `(address, room)` to bytes read, 0 at
/// the end of the stream.
type Read<'a> = &'a mut dyn FnMut(usize, usize) -> PyResult<usize>;
/// Makes a `bytes` of `n` bytes to fill, with the address of its buffer.
type Alloc<'a> = &'a mut dyn FnMut(usize) -> PyResult<(Py<PyBytes>, usize)>;

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
    fn new(first: &[u8], length: usize) -> Split {
        let mut body = Vec::with_capacity(length.min(READ_CHUNK).max(first.len()));
        body.extend_from_slice(first);
        Split {
            body,
            apart: Vec::new(),
            scan: 0,
            consumed: first.len(),
            length,
            in_chunks: false,
        }
    }

    /// Reads the rest of the frame.
    fn run(mut self, read: Read<'_>, alloc: Alloc<'_>) -> PyResult<Frame> {
        loop {
            self.scan_heads(read, alloc)?;
            if self.consumed == self.length {
                return Ok(Frame {
                    body: self.body,
                    apart: self.apart,
                    twin: None,
                });
            }
            let want = (self.length - self.consumed).min(READ_CHUNK);
            self.body.reserve(want);
            let spare = &mut self.body.spare_capacity_mut()[..want];
            let got = read(spare.as_mut_ptr() as usize, want)?;
            if got == 0 {
                return Err(ended());
            }
            // SAFETY: `read` wrote that many bytes into the spare capacity
            unsafe { self.body.set_len(self.body.len() + got) };
            self.consumed += got;
        }
    }

    /// Looks at the heads in `body` from `scan` on, as far as they are read,
    /// reading large byte strings apart as it meets them.
    fn scan_heads(&mut self, read: Read<'_>, alloc: Alloc<'_>) -> PyResult<()> {
        while let Some((head_len, major, argument)) = head_at(&self.body[self.scan..]) {
            let content = self.scan + head_len;
            match (major, argument) {
                (2 | 3, Some(n)) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let have = self.body.len() - content;
                    let left_in_frame = self.length - self.consumed + have;
                    if major == 2 && !self.in_chunks && n >= PART_MIN && n > have && n <= left_in_frame {
                        self.read_apart(read, alloc, content, n)?;
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
    fn read_apart(&mut self, read: Read<'_>, alloc: Alloc<'_>, at: usize, n: usize) -> PyResult<()> {
        let have = self.body.len() - at;
        let (bytes, start) = alloc(n)?;
        // SAFETY: `have` < n bytes into the new object's buffer of n bytes
        unsafe { std::ptr::copy_nonoverlapping(self.body[at..].as_ptr(), start as *mut u8, have) };
        self.body.truncate(at);
        let mut filled = have;
        while filled < n {
            match read(start + filled, n - filled)? {
                0 => return Err(ended()),
                got => filled += got,
            }
        }
        self.consumed += n - have;
        self.apart.push((at, bytes));
        Ok(())
    }
}

fn ended() -> PyErr {
    HostError::Protocol("the stream ended inside a frame".into()).into()
}

/// The head at the start of `data`: its length, major type and argument
/// (None for an indefinite length, or a break), or None if it is not all
/// there. A reserved head reads as a one-byte head: the decoder refuses it.
fn head_at(data: &[u8]) -> Option<(usize, u8, Option<u64>)> {
    let ib = *data.first()?;
    if ib & 0x1f >= 28 {
        return Some((1, ib >> 5, None));
    }
    let (argument, len) = argument(data)?; // (None now: the head is cut short)
    Some((len, ib >> 5, Some(argument)))
}
