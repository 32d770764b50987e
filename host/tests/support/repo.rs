//! Where the repository's shared files are, for the integration tests.

use std::path::PathBuf;

/// The repository's top folder. Read when the test runs, not baked in when it
/// is compiled: a warm target directory is shared by several checkouts (CI
/// builds a clean clone into it), and a test binary must read the files of
/// the checkout that runs it.
pub fn repo_root() -> PathBuf {
    let host = std::env::var_os("CARGO_MANIFEST_DIR").expect("run the host's tests with `cargo test`");
    PathBuf::from(host).join("..")
}
