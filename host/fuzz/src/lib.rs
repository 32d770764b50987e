//! The checks of host/tests/support/fuzz_oracle.rs, for the fuzz targets.

#[path = "../../tests/support/fuzz_oracle.rs"]
mod oracle;

pub use oracle::*;
