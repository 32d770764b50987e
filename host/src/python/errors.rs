//! The exceptions of `cpy2py.errors`, raised from Rust.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static PROTOCOL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A `cpy2py.errors.ProtocolError` carrying `msg`. Should the class not be
/// importable, a `ValueError` (its base class) with the same message.
pub fn protocol_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    match PROTOCOL_ERROR.import(py, "cpy2py.errors", "ProtocolError") {
        Ok(class) => PyErr::from_type(class.clone(), msg),
        Err(_) => PyValueError::new_err(msg),
    }
}
