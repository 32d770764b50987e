//! The extension module `cpy2py._host`: the compiled codec, native twin
//! processes and WASI guests, exposed to the Python kernel.

use pyo3::prelude::*;

mod codec;
mod equal_hashes;
mod errors;
mod host_calls;
mod map_keys;
mod moment;
mod plain;
mod received;
mod spec;
mod surrogates;
mod twin;
mod wasi;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    codec::register(m)?;
    spec::register(m)?;
    twin::register(m)?;
    moment::register(m)?;
    received::register(m)?;
    wasi::register(m)?;
    Ok(())
}
