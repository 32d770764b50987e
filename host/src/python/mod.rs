//! The extension module `cpy2py._host`: the compiled codec and native twin
//! processes, exposed to the Python kernel.

use pyo3::prelude::*;

mod codec;
mod errors;
mod twin;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    codec::register(m)?;
    twin::register(m)?;
    Ok(())
}
