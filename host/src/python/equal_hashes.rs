//! Keys of equal hash in a frame from a sandboxed guest.
//!
//! CPython finds a key among others of the same hash by comparing it with
//! each of them, so n distinct keys that share a hash cost about n*n/2
//! comparisons to insert. The hashes of str and bytes are keyed per process
//! (PYTHONHASHSEED), but an int's hash is its value modulo 2**61 - 1 and a
//! float's follows from it: 20,000 int keys of one hash fit in a 240 KB
//! frame and held the master's GIL for about 5 s. Frames decoded under a
//! budget (a guest's) refuse a dict or set with more than
//! [`MAX_EQUAL_HASHES`] keys or items of one hash.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::errors::ProtocolError;

/// More keys of one hash than any data but a crafted one has.
pub const MAX_EQUAL_HASHES: u32 = 64;

/// The hashes of one container's keys so far (made at its first key that
/// is not a str or bytes).
#[derive(Default)]
pub struct EqualHashes(Option<HashMap<isize, u32>>);

impl EqualHashes {
    /// Counts `key`; refuses the frame at the key that passes the limit.
    pub fn check(&mut self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        if key.is_exact_instance_of::<PyString>() || key.is_exact_instance_of::<PyBytes>() {
            return Ok(());
        }
        let Ok(hash) = key.hash() else {
            return Ok(()); // unhashable: inserting it says so
        };
        let count = self.0.get_or_insert_with(HashMap::new).entry(hash).or_insert(0);
        *count += 1;
        if *count > MAX_EQUAL_HASHES {
            return Err(ProtocolError::new_err(format!(
                "more than {MAX_EQUAL_HASHES} dict keys or set items of one hash in a frame from a \
                 sandboxed twin: inserting them would take time quadratic in their number"
            )));
        }
        Ok(())
    }

    /// Checks every item of a set about to be made, if `guard`.
    pub fn check_all(guard: bool, items: &[Bound<'_, PyAny>]) -> PyResult<()> {
        if guard {
            let mut equal = EqualHashes::default();
            for item in items {
                equal.check(item)?;
            }
        }
        Ok(())
    }
}
