//! `cpy2py._host.check_frame`: a frame checked against the protocol model
//! of `crate::protocol::message` (for the tests that record real sessions;
//! nothing on the call path uses it), and `render_for_guest`: what a guest
//! is given to read for a frame of the master (for the codec's tests).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::protocol_error;
use crate::protocol::message::{self, Link, Sender, Stage};
use crate::protocol::rendition;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_frame, m)?)?;
    m.add_function(wrap_pyfunction!(render_for_guest, m)?)?;
    Ok(())
}

/// The rendition a WASI guest is given of `frame`, a message of the master
/// (crate::protocol::rendition), or None when the frame goes as it is.
#[pyfunction]
fn render_for_guest<'py>(py: Python<'py>, frame: &[u8]) -> Option<Bound<'py, PyBytes>> {
    rendition::render(frame).map(|out| PyBytes::new(py, &out))
}

/// Checks one frame (its payload, without the length prefix) against the
/// spec: `stage` is "hello", "welcome", "answer" or "message", `sender`
/// "master" or "twin", `link` "trusted" or "sandboxed". Returns the frame's
/// kind ("request execute", "reply", "release", ...); raises ProtocolError
/// saying what does not match.
#[pyfunction]
#[pyo3(signature = (frame, stage, sender, link="trusted"))]
fn check_frame(py: Python<'_>, frame: &[u8], stage: &str, sender: &str, link: &str) -> PyResult<String> {
    let stage = match stage {
        "hello" => Stage::Hello,
        "welcome" => Stage::Welcome,
        "answer" => Stage::Answer,
        "message" => Stage::Message,
        other => {
            return Err(PyValueError::new_err(format!(
                "stage must be 'hello', 'welcome', 'answer' or 'message', not {other:?}"
            )))
        }
    };
    let sender = match sender {
        "master" => Sender::Master,
        "twin" => Sender::Twin,
        other => {
            return Err(PyValueError::new_err(format!(
                "sender must be 'master' or 'twin', not {other:?}"
            )))
        }
    };
    let link = match link {
        "trusted" => Link::Trusted,
        "sandboxed" => Link::Sandboxed,
        other => {
            return Err(PyValueError::new_err(format!(
                "link must be 'trusted' or 'sandboxed', not {other:?}"
            )))
        }
    };
    message::check_frame(frame, stage, sender, link)
        .map(|frame| frame.kind())
        .map_err(|e| protocol_error(py, e.to_string()))
}
