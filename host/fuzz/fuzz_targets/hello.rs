//! The handshake's hello parser on arbitrary bytes: an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpy2py_host_fuzz::check_hello(data);
});
