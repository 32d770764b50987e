//! The cpy2py host: the twin protocol, native twin processes and, with the
//! `python` feature, the extension module `cpy2py._host`.

pub mod error;
pub mod native;
pub mod pipe;
pub mod process;
pub mod protocol;
pub mod signals;
pub mod spin;
pub mod wasm;

#[cfg(feature = "python")]
mod python;

pub use error::{HostError, Result};

#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
#[pymodule]
fn _host(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)
}
