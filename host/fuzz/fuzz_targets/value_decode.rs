//! `Value::decode` on arbitrary bytes: it never panics, and whatever it
//! accepts has one canonical encoding that decodes again to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpy2py_host_fuzz::check_value(data);
});
