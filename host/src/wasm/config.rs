//! What a guest runs and within which limits: the sandbox defaults (the one
//! source of them: `cpy2py._host` exports them to Python), the guest's
//! mounts, and the cache directory.

use std::path::PathBuf;
use std::time::Duration;

/// Defaults of the sandbox limits (documented in docs/security.md).
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
pub const DEFAULT_OUTPUT_LIMIT: usize = 4 << 20;
/// Frames the guest sent that the master has not read yet, in bytes, before
/// the guest's `send` waits.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Table elements per guest (each costs the host a pointer).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Where the guest finds the Python standard library and componentize-py's helpers.
pub const STDLIB_MOUNT: &str = "/python";
pub const BUNDLED_MOUNT: &str = "/bundled";
/// Where the guest's own modules (cpy2py, app.py) were imported from when the
/// component was built; mounted again so that tracebacks show their source.
pub const KERNEL_MOUNT: &str = "/0";
/// Where the guest finds bytecode the host cached for it (`sys.pycache_prefix`).
pub const PYCACHE_MOUNT: &str = "/pycache";
/// The interface name of the frame link in the guest's world (wasm/wit/world.wit).
pub const LINK_INTERFACE: &str = "cpy2py:guest/link@0.1.0";

/// What to run and within which limits.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub twin_id: String,
    /// The guest component (wasm/build/cpy2py-guest.wasm).
    pub guest_file: PathBuf,
    /// The Python standard library that goes with it, mounted read-only.
    pub stdlib_dir: PathBuf,
    /// componentize-py's helper modules, mounted read-only if present.
    pub bundled_dir: Option<PathBuf>,
    /// The guest's own Python sources as staged for the build, mounted
    /// read-only at `KERNEL_MOUNT` if present.
    pub kernel_dir: Option<PathBuf>,
    /// Roots the guest may import code from.
    pub paths: Vec<PathBuf>,
    /// Installed distributions the guest sees: each a root (a site-packages
    /// directory) with exactly the files listed (relative to it).
    pub packages: Vec<(PathBuf, Vec<PathBuf>)>,
    /// What the master found its modules to be when it keyed their cached
    /// bytecode and snapshot (cpy2py/packages.py, `sources_stamp`): their
    /// view is copied again when it changes (view.rs).
    pub packages_stamp: String,
    /// Bytecode compiled for the guest's sources, mounted read-only at
    /// `PYCACHE_MOUNT` if given.
    pub pycache_dir: Option<PathBuf>,
    pub memory_limit: usize,
    /// Guest running time per call (None: unlimited); see ledger.rs.
    pub timeout: Option<Duration>,
    pub max_frame: usize,
    pub output_limit: usize,
    pub cache_dir: PathBuf,
    pub handshake_timeout: Duration,
}

impl GuestConfig {
    pub fn new(twin_id: &str, guest_file: PathBuf, stdlib_dir: PathBuf) -> Self {
        GuestConfig {
            twin_id: twin_id.to_string(),
            guest_file,
            stdlib_dir,
            bundled_dir: None,
            kernel_dir: None,
            paths: Vec::new(),
            packages: Vec::new(),
            packages_stamp: String::new(),
            pycache_dir: None,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            timeout: Some(DEFAULT_TIMEOUT),
            max_frame: DEFAULT_MAX_FRAME,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            cache_dir: default_cache_dir(),
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

/// `$CPY2PY_CACHE_DIR`, else `$XDG_CACHE_HOME/cpy2py`, else `~/.cache/cpy2py`.
pub fn default_cache_dir() -> PathBuf {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("CPY2PY_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("cpy2py")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("cpy2py")))
        .unwrap_or_else(|| std::env::temp_dir().join("cpy2py-cache"))
}
