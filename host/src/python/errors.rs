//! The one mapping from host errors to Python exceptions. The classes of
//! `cpy2py.errors` are imported once, on first use, and cached by pyo3.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::error::HostError;

pyo3::import_exception!(cpy2py.errors, ProtocolError);
pyo3::import_exception!(cpy2py.errors, TwinStartError);
pyo3::import_exception!(cpy2py.errors, TwinterpreterTerminated);
pyo3::import_exception!(cpy2py.errors, TwinTimeout);
pyo3::import_exception!(cpy2py.errors, TwinMemoryError);

impl From<HostError> for PyErr {
    fn from(err: HostError) -> PyErr {
        let msg = err.to_string();
        match err {
            HostError::Spawn(_) => TwinStartError::new_err(msg),
            HostError::Protocol(_) | HostError::VersionMismatch { .. } => ProtocolError::new_err(msg),
            HostError::Terminated(_) => TwinterpreterTerminated::new_err(msg),
            HostError::Timeout(_) => TwinTimeout::new_err(msg),
            HostError::OutOfMemory(_) => TwinMemoryError::new_err(msg),
            HostError::Codec(_) | HostError::Usage(_) => PyValueError::new_err(msg),
            // BrokenPipeError, InterruptedError, ... with the system's message
            HostError::Io(e) => PyErr::from(e),
        }
    }
}

/// A `cpy2py.errors.ProtocolError` carrying `msg` (the compiled codec's
/// refusals of malformed input, raised with the GIL held).
pub fn protocol_error(_py: Python<'_>, msg: impl Into<String>) -> PyErr {
    ProtocolError::new_err(msg.into())
}
