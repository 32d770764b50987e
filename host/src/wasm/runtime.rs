//! What all guests of this process share: the wasmtime engine, the epoch
//! ticker that enforces call timeouts, and the compiled guest component,
//! cached on disk so that only the first start on a machine compiles it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::config::MAX_TABLE_ELEMENTS;
use super::driver::Shared;
use super::fault_around;
use super::imports::{add_link_to_linker, GuestState};
use crate::error::{HostError, Result};

/// The wasmtime version the host is built with (part of the cache key).
pub const WASMTIME_VERSION: &str = "48";
/// How often the epoch advances: the resolution of call timeouts.
pub const TICK: Duration = Duration::from_millis(10);
/// How often it advances while a thread runs a guest for a slice shorter
/// than `TICK` (an event loop's: see `Runtime::fine_ticks`), which ends on
/// the first tick past its end. (1 ms cost awaited no-op calls to a guest
/// about 5% more than 2 ms, for the same pause of the loop.)
pub const FINE_TICK: Duration = Duration::from_millis(2);
/// A guest stuck in a host call (a sleep, say) is declared timed out this long
/// after its deadline; running wasm is stopped within one tick.
pub const HOST_CALL_GRACE: Duration = Duration::from_millis(250);
/// Native stack for the guest's compiled wasm code.
///
/// CPython guards against deep recursion in C code by the stack pointer, but
/// CPython 3.14 for WASI measures its *shadow* stack: the part of linear
/// memory where C keeps locals whose address is taken (1 MiB in the guest,
/// bounds from `pthread_getattr_np`), and raises RecursionError ("Stack
/// overflow (used 1008 kB)") when that is nearly used up. The wasm frames
/// themselves live on the native stack wasmtime gives the guest, which C
/// recursion uses 10 to 40 times faster. Measured in the guest, at the depth
/// where CPython raises RecursionError: `repr` of nested lists or dicts at
/// 32,000 levels, `json.dumps` at 16,000 levels (~420 bytes a level, 6.6
/// MiB), `==` of nested lists at 64,000 levels (~355 bytes a level, 23 MiB).
/// With 4 MiB all of these exhausted the native stack first and the guest
/// trapped. Deallocating nested lists or tuples uses no shadow stack at all,
/// so CPython's trashcan (`_Py_Dealloc` defers objects when the shadow stack
/// is nearly used up) never engages there; it costs ~272 bytes of native
/// stack a level: 64 MiB frees a list nested ~245,000 deep (100,000 needs 27
/// MiB), deeper ones still trap and end the guest (docs/security.md).
/// The memory is reserved, not used: only pages a deep recursion touched
/// are resident, and they go with the guest.
pub const MAX_WASM_STACK: usize = 64 << 20;
/// The guest's stack: the guest runs on a fiber (a stack of its own that
/// the thread driving it switches to, see guest.rs), which holds the wasm
/// stack above plus room for the host frames inside host calls made at the
/// deepest point (WASI, the `link` imports; wasmtime assumes at least 128
/// KiB).
pub const GUEST_STACK: usize = MAX_WASM_STACK + (8 << 20);

pub struct Runtime {
    pub engine: Engine,
    /// Whether guests come from wasmtime's pooling allocator (see `new_engine`).
    pub pooled: bool,
    /// The address range of the pool's memories, if found
    memory_pool: Option<Range<usize>>,
    guests: Mutex<Vec<Weak<Shared>>>,
    guests_changed: Condvar,
    /// The short slices of running a guest (`fine_ticks`), which make the
    /// ticker tick every `FINE_TICK`
    fine_slices: Mutex<FineSlices>,
    fine_slices_changed: Condvar,
    loaded: Mutex<HashMap<PathBuf, (FileStamp, Arc<LoadedGuest>)>>,
}

/// The threads running a guest for a short slice now, and when the last
/// such slice ended.
#[derive(Default)]
struct FineSlices {
    running: usize,
    last_end: Option<Instant>,
}

impl FineSlices {
    /// The ticker's interval: `FINE_TICK` while a short slice runs and for a
    /// `TICK` after the last one ended (awaited calls come one after the
    /// other: the ticker stays fine between them, and none needs to wake it).
    fn tick(&self, now: Instant) -> Duration {
        let recent = self
            .last_end
            .is_some_and(|end| now.saturating_duration_since(end) < TICK);
        if self.running > 0 || recent {
            FINE_TICK
        } else {
            TICK
        }
    }
}

/// A thread's short slice of running a guest (see `Runtime::fine_ticks`).
pub struct FineTicks(&'static Runtime);

impl Drop for FineTicks {
    fn drop(&mut self) {
        let mut slices = self.0.fine_slices.lock().unwrap_or_else(|e| e.into_inner());
        slices.running -= 1;
        slices.last_end = Some(Instant::now());
    }
}

/// The compiled guest, ready to instantiate.
pub struct LoadedGuest {
    pub pre: CommandPre<GuestState>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// Guests that can run at once in one process, unless
/// `CPY2PY_WASI_MAX_GUESTS` says otherwise: each takes a slot of wasmtime's
/// pooling allocator (its instances, memories, tables and fiber stack:
/// address space reserved once, which costs nothing until used).
pub const DEFAULT_MAX_GUESTS: u32 = 1000;

/// The number of guests that can run at once (read once per process).
pub fn max_guests() -> u32 {
    static MAX: OnceLock<u32> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("CPY2PY_WASI_MAX_GUESTS")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&n| (1..=100_000).contains(&n))
            .unwrap_or(DEFAULT_MAX_GUESTS)
    })
}
/// What one guest component needs of the pool (the componentize-py guest
/// has 14 core modules; room is left for a larger build).
const CORE_INSTANCES_PER_GUEST: u32 = 32;
const MEMORIES_PER_GUEST: u32 = 4;
const TABLES_PER_GUEST: u32 = 8;
/// Bytes of the per-instance state wasmtime keeps (the CPython module has
/// many functions, imports and globals).
const MAX_CORE_INSTANCE_SIZE: usize = 1 << 20;

fn engine_config(pooled: bool) -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .wasm_component_model(true)
        .max_wasm_stack(MAX_WASM_STACK)
        // the guest runs on a fiber driven by the master's calling thread
        .async_stack_size(GUEST_STACK)
        .cranelift_opt_level(OptLevel::Speed);
    if std::env::var_os("CPY2PY_WASI_PERFMAP").is_some_and(|v| v == "1") {
        // for `perf record` of a master running guests: wasmtime writes
        // /tmp/perf-<pid>.map, naming the guest's functions (benches/README.md)
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if pooled {
        // A guest's instances, memories, tables and stack come from slots
        // reserved once: starting and ending one maps and unmaps nothing.
        // A slot given back is reset (its memory to the guest's initial
        // image, the rest zeroed) before another guest gets it, so no guest
        // sees what the previous one left (tests: pooled_slots_are_reset).
        // Fiber stacks are zeroed too, as a defence in depth. The slots keep
        // nothing resident (`*_keep_resident`): resetting pages in place
        // saves a guest about 300 of its 650 page faults at start, but the
        // PAGEMAP_SCAN reset behind it skips dirty pages that were swapped
        // out (wasmtime PR 14357, open), which the next guest would read.
        let guests = max_guests();
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(guests)
            .total_core_instances(guests * CORE_INSTANCES_PER_GUEST)
            .max_core_instances_per_component(CORE_INSTANCES_PER_GUEST)
            .total_memories(guests * MEMORIES_PER_GUEST)
            .max_memories_per_component(MEMORIES_PER_GUEST)
            .max_memories_per_module(MEMORIES_PER_GUEST)
            .total_tables(guests * TABLES_PER_GUEST)
            .max_tables_per_component(TABLES_PER_GUEST)
            .max_tables_per_module(TABLES_PER_GUEST)
            .table_elements(MAX_TABLE_ELEMENTS)
            .max_core_instance_size(MAX_CORE_INSTANCE_SIZE)
            .total_stacks(guests);
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .async_stack_zeroing(true);
    }
    config
}

/// The engine: pooled, unless the address space for the pool cannot be
/// reserved (a `ulimit -v`, say): then each guest maps its own. With the
/// pool, the address range of its memories (see fault_around.rs).
fn new_engine() -> std::result::Result<(Engine, bool, Option<Range<usize>>), String> {
    match fault_around::with_new_reservation(|| Engine::new(&engine_config(true))) {
        (Ok(engine), memory_pool) => Ok((engine, true, memory_pool)),
        (Err(pooled), _) => {
            tracing::warn!(
                "wasmtime's pooling allocator is not available ({pooled:#}); guests map their own memory"
            );
            Engine::new(&engine_config(false))
                .map(|engine| (engine, false, None))
                .map_err(|e| format!("cannot set up wasmtime for WASI guests: {e}"))
        }
    }
}

/// wasmtime compiles on rayon's global pool, whose threads would otherwise
/// carry the name of the thread that first compiled (a Linux thread inherits
/// its creator's): a snapshot's or a pool slot's, which then seemed to run
/// for ever. They are named for what they are, made at the first compilation
/// as before (unless the process set the pool up earlier: it keeps its own).
fn name_compile_threads() {
    static NAMED: std::sync::Once = std::sync::Once::new();
    NAMED.call_once(|| {
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|_| "cpy2py-compile".into())
            .build_global();
    });
}

/// Set in the child of a `fork` of a process that had the runtime.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn forked_child() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Whether this process is a forked child of one that ran WASI guests. Its
/// copy of the runtime is unusable: the epoch ticker (the timeouts) and
/// wasmtime-wasi's tokio threads (the clocks) did not survive the fork, and
/// locks other threads of the parent held stay held. Guests are refused in
/// such a child (python/wasi.rs), before any lock is touched.
pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// What a forked child is told when it uses a guest of its parent (see
/// `forked`).
pub fn forked_message(twin_id: &str) -> String {
    format!(
        "the WASI guest {twin_id:?} lives in the process that started it; this is a forked child of \
         that process, where it cannot run (the host's threads, which enforce its timeout, did not \
         survive the fork): call it from the parent, or run sandboxed twins in a process made with \
         multiprocessing's 'spawn' or 'forkserver' start method"
    )
}

/// The runtime of this process, created on first use.
pub fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();
    if forked() {
        return Err(HostError::Spawn(
            "WASI guests cannot start in a forked child of a process that ran guests (the host's \
             threads, which enforce their timeouts, did not survive the fork): start them in the parent, \
             or in a process made with multiprocessing's 'spawn' or 'forkserver' start method"
                .into(),
        ));
    }
    RUNTIME
        .get_or_init(|| {
            // SAFETY: registers a handler that only stores to an atomic
            unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
            let (engine, pooled, memory_pool) = new_engine()?;
            super::trap_handlers::save(); // (the engine installed them)
            Ok(Runtime {
                engine,
                pooled,
                memory_pool,
                guests: Mutex::default(),
                guests_changed: Condvar::new(),
                fine_slices: Mutex::default(),
                fine_slices_changed: Condvar::new(),
                loaded: Mutex::default(),
            })
        })
        .as_ref()
        .map_err(|e| HostError::Spawn(e.clone()))
}

impl Runtime {
    /// After an instantiation: read faults in the guests' memory images
    /// map one page each (fault_around.rs); whether they do.
    pub fn narrow_read_faults(&self) -> bool {
        self.memory_pool.as_ref().is_some_and(fault_around::narrow)
    }

    /// Enrols a running guest with the ticker (which starts on first use and
    /// sleeps while no guest runs).
    pub fn register(&'static self, guest: &Arc<Shared>) {
        static TICKER: OnceLock<()> = OnceLock::new();
        TICKER.get_or_init(|| {
            thread::Builder::new()
                .name("cpy2py-wasi-ticker".into())
                .spawn(move || self.tick_forever())
                .expect("cannot start the cpy2py epoch ticker thread");
        });
        let mut guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
        guests.push(Arc::downgrade(guest));
        self.guests_changed.notify_all();
    }

    /// The ticker ticks every `FINE_TICK` while the guard is held (and for a
    /// `TICK` after): a slice shorter than `TICK` (an event loop runs a guest
    /// for 2 ms) then ends within `FINE_TICK` of its end instead of `TICK`.
    /// Every guest running meanwhile yields at each tick (a fiber switch).
    /// Only a slice that finds the ticker coarse wakes it: waking it for
    /// every awaited no-op call cost a third of one, on one CPU.
    pub fn fine_ticks(&'static self) -> FineTicks {
        let mut slices = self.fine_slices.lock().unwrap_or_else(|e| e.into_inner());
        let coarse = slices.tick(Instant::now()) == TICK;
        slices.running += 1;
        if coarse {
            self.fine_slices_changed.notify_all(); // (it may be 10 ms from its next tick)
        }
        FineTicks(self)
    }

    /// Waits for the next tick (woken early when a short slice starts while
    /// it ticks coarsely: that wake-up is one more tick).
    fn wait_for_tick(&self) {
        let slices = self.fine_slices.lock().unwrap_or_else(|e| e.into_inner());
        let tick = slices.tick(Instant::now());
        drop(
            self.fine_slices_changed
                .wait_timeout(slices, tick)
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Guests registered and not ended.
    pub fn live_guests(&self) -> usize {
        let guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
        guests
            .iter()
            .filter(|g| g.upgrade().is_some_and(|g| !g.has_ended()))
            .count()
    }

    fn tick_forever(&self) {
        let mut last_check = Instant::now();
        loop {
            {
                let mut guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    guests.retain(|g| g.upgrade().is_some_and(|g| !g.has_ended()));
                    if !guests.is_empty() {
                        break;
                    }
                    guests = self
                        .guests_changed
                        .wait(guests)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
            self.wait_for_tick();
            self.engine.increment_epoch();
            // the watchdog for guests blocked in a host call, where epochs do not reach
            if last_check.elapsed() >= HOST_CALL_GRACE / 2 {
                last_check = Instant::now();
                let guests: Vec<Arc<Shared>> = self
                    .guests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter_map(Weak::upgrade)
                    .collect();
                for guest in guests {
                    guest.check_overdue(last_check, HOST_CALL_GRACE);
                }
            }
        }
    }

    /// The guest component at `guest_file`, compiled (or loaded from the cache
    /// in `cache_dir`) and linked; shared by every guest of this process.
    pub fn load_guest(&self, guest_file: &Path, cache_dir: &Path) -> Result<Arc<LoadedGuest>> {
        let meta = fs::metadata(guest_file).map_err(|e| missing_guest(guest_file, e))?;
        let stamp = FileStamp::of(&meta);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, guest)) = loaded.get(guest_file) {
            if *known == stamp {
                return Ok(Arc::clone(guest));
            }
        }
        // the index remembers which key a guest file with this very size, time
        // and inode had, so a new process skips reading and hashing 20 MB
        let index = IndexEntry::new(guest_file, &meta, cache_dir);
        let component = match index.as_ref().and_then(|i| i.cached_key()) {
            Some(key) => match self.deserialize(&cache_dir.join(cache_name(&key))) {
                Some(component) => component,
                None => self.compile_and_index(guest_file, cache_dir, index.as_ref())?,
            },
            None => self.compile_and_index(guest_file, cache_dir, index.as_ref())?,
        };
        let pre = link(&self.engine, &component)?;
        let guest = Arc::new(LoadedGuest { pre });
        loaded.insert(guest_file.to_path_buf(), (stamp, Arc::clone(&guest)));
        Ok(guest)
    }

    /// Whether `load_guest` of this very guest file would return at once
    /// (it was loaded in this process, and has not changed since). Never
    /// waits: while another thread loads or compiles a guest, it says no.
    pub fn has_loaded(&self, guest_file: &Path) -> bool {
        let Ok(meta) = fs::metadata(guest_file) else {
            return false;
        };
        let loaded = match self.loaded.try_lock() {
            Ok(loaded) => loaded,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        loaded
            .get(guest_file)
            .is_some_and(|(known, _)| *known == FileStamp::of(&meta))
    }

    /// Reads and hashes the guest, loads or compiles it, and records its key.
    fn compile_and_index(
        &self,
        guest_file: &Path,
        cache_dir: &Path,
        index: Option<&IndexEntry>,
    ) -> Result<Component> {
        let bytes = fs::read(guest_file).map_err(|e| missing_guest(guest_file, e))?;
        let key = cache_key(&bytes, &self.engine);
        let component = self.compiled(&bytes, Some(guest_file), &cache_dir.join(cache_name(&key)))?;
        if let Some(index) = index {
            let replaced = index.recorded_key();
            index.record(&key);
            // a new build of this guest file: its predecessor's compilation
            // (about 40 MB) goes, unless another guest file has it too
            if let Some(old) = replaced.filter(|old| *old != key) {
                remove_unreferenced(cache_dir, &old);
            }
        }
        Ok(component)
    }

    /// The cached compilation in `cache_file`, if it is there and usable.
    fn deserialize(&self, cache_file: &Path) -> Option<Component> {
        if !cache_file.exists() {
            return None;
        }
        // SAFETY: the file was written by `precompile_component` of an
        // engine with the same configuration and wasmtime version (both
        // are in its name), into the user's own cache directory.
        match unsafe { Component::deserialize_file(&self.engine, cache_file) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(file = %cache_file.display(), "unusable cached guest, compiling again: {e}");
                let _ = fs::remove_file(cache_file);
                None
            }
        }
    }

    /// A guest component instrumented for a snapshot (snapshot.rs),
    /// compiled without a word on stderr, once: cached as
    /// `instrumented-<key>.cwasm`, the only such file kept (another guest
    /// build's goes when this one is made).
    pub fn instrumented(&self, bytes: &[u8], cache_dir: &Path) -> Result<Component> {
        let name = format!("instrumented-{}.cwasm", cache_key(bytes, &self.engine));
        let cache_file = cache_dir.join(&name);
        if !cache_file.exists() {
            for entry in fs::read_dir(cache_dir).into_iter().flatten().flatten() {
                let other = entry.file_name().to_string_lossy().into_owned();
                if other.starts_with("instrumented-") && other != name {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        self.compiled(bytes, None, &cache_file)
    }

    /// `bytes` compiled, or loaded from `cache_file` if it is there; a
    /// compilation is said on stderr, naming `guest_file`, when one is given.
    fn compiled(&self, bytes: &[u8], guest_file: Option<&Path>, cache_file: &Path) -> Result<Component> {
        if let Some(component) = self.deserialize(cache_file) {
            return Ok(component);
        }
        let dir = cache_file.parent().unwrap_or(Path::new("."));
        let started = Instant::now();
        if let Some(guest_file) = guest_file {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(
                stderr,
                "cpy2py: compiling the WASI guest {} for this machine (first use; cached in {}) ...",
                guest_file.display(),
                dir.display()
            );
            let _ = stderr.flush();
        }
        name_compile_threads();
        let compiled = self.engine.precompile_component(bytes);
        if guest_file.is_some() {
            let outcome = if compiled.is_ok() { "done" } else { "failed" };
            let _ = writeln!(
                std::io::stderr(),
                " {outcome} after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let named = guest_file.map_or_else(
            || "the instrumented guest".to_string(),
            |f| f.display().to_string(),
        );
        let compiled = compiled.map_err(|e| {
            HostError::Spawn(format!(
                "{named} is not a WASI guest component wasmtime can compile ({e}); rebuild it with `just wasm`"
            ))
        })?;
        let stored = fs::create_dir_all(dir).and_then(|_| {
            let tmp = cache_file.with_extension(format!("tmp{}", std::process::id()));
            fs::write(&tmp, &compiled)?;
            fs::rename(&tmp, cache_file)
        });
        match stored {
            // loading from the file maps it (copy-on-write) instead of keeping a copy in memory
            Ok(()) => unsafe { Component::deserialize_file(&self.engine, cache_file) },
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "cannot cache the compiled guest: {e}");
                unsafe { Component::deserialize(&self.engine, &compiled) }
            }
        }
        .map_err(|e| HostError::Spawn(format!("cannot load the compiled WASI guest: {e}")))
    }
}

fn cache_name(key: &str) -> String {
    format!("cpy2py-guest-{key}.cwasm")
}

/// One line of the cache index: a guest file's identity (path, size,
/// modification time, inode) and the cache key of its contents.
struct IndexEntry {
    file: PathBuf,
    identity: String,
}

impl IndexEntry {
    fn new(guest_file: &Path, meta: &fs::Metadata, cache_dir: &Path) -> Option<IndexEntry> {
        use std::os::unix::fs::MetadataExt;
        let path = fs::canonicalize(guest_file).ok()?;
        let mut hasher = DefaultHasher::new();
        path.hash(&mut hasher);
        WASMTIME_VERSION.hash(&mut hasher);
        Some(IndexEntry {
            file: cache_dir.join(format!("index-{:016x}", hasher.finish())),
            identity: format!(
                "{} {} {} {} {}",
                path.display(),
                meta.len(),
                meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
                meta.ino(),
                meta.dev()
            ),
        })
    }

    fn cached_key(&self) -> Option<String> {
        let (identity, key) = read_index(&self.file)?;
        (identity == self.identity).then_some(key)
    }

    /// The key recorded for this path, whatever file it was then.
    fn recorded_key(&self) -> Option<String> {
        read_index(&self.file).map(|(_, key)| key)
    }

    fn record(&self, key: &str) {
        let tmp = self.file.with_extension(format!("tmp{}", std::process::id()));
        let written =
            fs::write(&tmp, format!("{}\n{key}\n", self.identity)).and_then(|_| fs::rename(&tmp, &self.file));
        if let Err(e) = written {
            tracing::debug!(file = %self.file.display(), "cannot write the guest cache index: {e}");
        }
    }
}

/// An index file's (identity, key).
fn read_index(file: &Path) -> Option<(String, String)> {
    let text = fs::read_to_string(file).ok()?;
    let (identity, key) = text.trim_end().rsplit_once('\n')?;
    (!key.is_empty() && !key.contains('/')).then(|| (identity.to_string(), key.to_string()))
}

/// Removes the compilation with `key` from `cache_dir` unless an index
/// still names it. (A process that mapped it keeps its mapping.)
fn remove_unreferenced(cache_dir: &Path, key: &str) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("index-")
            && read_index(&entry.path()).is_some_and(|(_, other)| other == key)
        {
            return;
        }
    }
    let _ = fs::remove_file(cache_dir.join(cache_name(key)));
}

/// Forgets the compilation of the guest file at `guest_file` (a snapshot
/// the master removes, cpy2py/snapshots.py): its index entry, and the
/// compilation itself unless another guest file has it too.
pub fn forget_guest(guest_file: &Path, cache_dir: &Path) {
    let Ok(meta) = fs::metadata(guest_file) else {
        return;
    };
    if let Some(index) = IndexEntry::new(guest_file, &meta, cache_dir) {
        let key = index.recorded_key();
        let _ = fs::remove_file(&index.file);
        if let Some(key) = key {
            remove_unreferenced(cache_dir, &key);
        }
    }
}

fn missing_guest(path: &Path, err: std::io::Error) -> HostError {
    HostError::Spawn(format!(
        "the WASI guest component {} cannot be read ({err}): build it with `just wasm` \
         (or point CPY2PY_WASI_GUEST at a built cpy2py-guest.wasm)",
        path.display()
    ))
}

/// Links WASI (as granted per guest in its `WasiCtx`; its asynchronous
/// version, so that a guest waiting for a clock suspends its fiber instead of
/// blocking the thread that drives it) and the `link` interface to the guest
/// component.
fn link(engine: &Engine, component: &Component) -> Result<CommandPre<GuestState>> {
    let setup = guest_linker(engine)
        .and_then(|linker| linker.instantiate_pre(component))
        .and_then(CommandPre::new);
    setup.map_err(|e| {
        HostError::Spawn(format!(
            "the WASI guest component does not fit this host ({e}); rebuild it with `just wasm`"
        ))
    })
}

/// What a guest imports: WASI (as granted per guest in its `WasiCtx`) and
/// the `link` interface. Guests and snapshots (snapshot.rs) link the same.
pub fn guest_linker(engine: &Engine) -> wasmtime::Result<Linker<GuestState>> {
    let mut linker = Linker::<GuestState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    add_link_to_linker(&mut linker)?;
    Ok(linker)
}

/// A fast hash of the guest's bytes with the wasmtime version and engine
/// settings: a new guest build or another wasmtime never reuses a stale
/// compilation. (Not a cryptographic hash: the cache directory is the user's.)
pub fn cache_key(bytes: &[u8], engine: &Engine) -> String {
    let mut settings = DefaultHasher::new();
    WASMTIME_VERSION.hash(&mut settings);
    engine.precompile_compatibility_hash().hash(&mut settings);
    format!(
        "{:016x}{:016x}-wasmtime{WASMTIME_VERSION}-{:08x}",
        content_hash(bytes, 0x9E37_79B9_7F4A_7C15),
        content_hash(bytes, 0xC2B2_AE3D_27D4_EB4F),
        settings.finish() as u32
    )
}

/// 64-bit multiply-rotate hash over 8-byte words (a few ms for a 20 MB guest).
fn content_hash(bytes: &[u8], seed: u64) -> u64 {
    const K: u64 = 0xFF51_AFD7_ED55_8CCD;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        h = (h ^ w.wrapping_mul(K))
            .rotate_left(29)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K);
    }
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticker_ticks_fine_while_short_slices_run_and_goes_back_a_tick_after() {
        let start = Instant::now();
        let mut slices = FineSlices::default();
        assert_eq!(slices.tick(start), TICK);
        slices.running = 2;
        assert_eq!(slices.tick(start), FINE_TICK);
        slices.running = 0;
        slices.last_end = Some(start);
        assert_eq!(slices.tick(start + TICK / 2), FINE_TICK); // (the next call's slice comes soon)
        assert_eq!(slices.tick(start + TICK), TICK);
        // a guard counts its slice while held, and its end
        let runtime = runtime().unwrap();
        let guard = runtime.fine_ticks();
        assert_eq!(runtime.fine_slices.lock().unwrap().running, 1);
        drop(guard);
        let after = runtime.fine_slices.lock().unwrap();
        assert_eq!(after.running, 0);
        assert!(after.last_end.is_some_and(|end| end >= start));
    }

    #[test]
    fn cache_key_changes_with_every_byte_and_names_wasmtime() {
        let engine = &runtime().unwrap().engine;
        let a = vec![7u8; 100_001];
        let mut b = a.clone();
        b[50_000] ^= 1;
        let mut c = a.clone();
        c.push(0);
        let (ka, kb, kc) = (
            cache_key(&a, engine),
            cache_key(&b, engine),
            cache_key(&c, engine),
        );
        assert_ne!(ka, kb);
        assert_ne!(ka, kc);
        assert_eq!(ka, cache_key(&a.clone(), engine), "the key is stable");
        assert!(ka.contains("wasmtime48"), "{ka}");
    }

    /// `has_loaded` never waits: while another thread holds the table of
    /// loaded guests (it loads or compiles one, for seconds), it says no at
    /// once, so that a start can decide to wait for the compilation in
    /// slices (python/wasi.rs, `interruptible`).
    #[test]
    fn has_loaded_never_waits_for_a_thread_that_loads_a_guest() {
        let rt = runtime().unwrap();
        let file = std::env::temp_dir().join(format!("cpy2py-has-loaded-{}", std::process::id()));
        fs::write(&file, b"not a guest").unwrap();
        let held = rt.loaded.lock().unwrap(); // as a thread compiling a guest holds it
        let (answer, answered) = std::sync::mpsc::channel();
        let asked = file.clone();
        std::thread::spawn(move || answer.send(runtime().unwrap().has_loaded(&asked)));
        let got = answered.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        let _ = fs::remove_file(&file);
        assert_eq!(got, Ok(false), "has_loaded waited for the thread that loads");
    }

    /// A slot of the pooling allocator that another instance gets back
    /// holds the initial image again: what the previous instance wrote (in
    /// its initialized data, in fresh pages, in memory it grew) is gone.
    #[test]
    fn pooled_slots_are_reset() {
        use wasmtime::{Instance, Module, Store};
        let rt = runtime().unwrap();
        assert!(rt.pooled, "the pooling allocator is in use");
        let engine = &rt.engine;
        let module = Module::new(
            engine,
            wat::parse_str(
                r#"(module
                    (memory (export "memory") 2)
                    (data (i32.const 16) "initial image")
                    (func (export "scribble")
                        (memory.fill (i32.const 0) (i32.const 0x5A) (i32.const 131072))
                        (drop (memory.grow (i32.const 1)))
                        (memory.fill (i32.const 131072) (i32.const 0xA5) (i32.const 65536))))"#,
            )
            .unwrap(),
        )
        .unwrap();
        let instantiate = || {
            let mut store = Store::new(engine, ());
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = Instance::new(&mut store, &module, &[]).unwrap();
            let memory = instance.get_memory(&mut store, "memory").unwrap();
            (store, instance, memory)
        };
        let (mut store, instance, memory) = instantiate();
        let first_base = memory.data_ptr(&store) as usize;
        let scribble = instance.get_typed_func::<(), ()>(&mut store, "scribble").unwrap();
        scribble.call(&mut store, ()).unwrap();
        assert_eq!(memory.data(&store)[0], 0x5A);
        assert_eq!(memory.data_size(&store), 3 * 65536);
        drop(store);

        let (mut store, _instance, memory) = instantiate();
        assert_eq!(
            memory.data_ptr(&store) as usize,
            first_base,
            "the second instance must get the same pool slot, or this test shows nothing"
        );
        assert_eq!(
            memory.data_size(&store),
            2 * 65536,
            "the memory is back at its initial size"
        );
        let data = memory.data(&store);
        assert_eq!(&data[16..29], b"initial image");
        assert!(
            data[..16].iter().chain(&data[29..]).all(|&b| b == 0),
            "pages the previous instance wrote are zero again"
        );
        memory.grow(&mut store, 1).unwrap();
        assert!(
            memory.data(&store)[2 * 65536..].iter().all(|&b| b == 0),
            "so is memory it grew"
        );
    }

    #[test]
    fn cache_dir_follows_the_environment() {
        // only reads the variables; the order of precedence is what matters
        let dir = crate::wasm::config::default_cache_dir();
        if let Some(explicit) = std::env::var_os("CPY2PY_CACHE_DIR").filter(|v| !v.is_empty()) {
            assert_eq!(dir, PathBuf::from(explicit));
        } else {
            assert!(dir.ends_with("cpy2py"), "{}", dir.display());
        }
    }

    #[test]
    fn a_missing_guest_says_how_to_build_it() {
        let rt = runtime().unwrap();
        let err = rt
            .load_guest(Path::new("/nonexistent/cpy2py-guest.wasm"), &std::env::temp_dir())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("just wasm") && err.contains("CPY2PY_WASI_GUEST"),
            "{err}"
        );
    }

    #[test]
    fn the_index_remembers_a_key_for_exactly_that_file() {
        let dir = std::env::temp_dir().join(format!("cpy2py-index-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("guest.wasm");
        fs::write(&file, b"first").unwrap();
        let entry = IndexEntry::new(&file, &fs::metadata(&file).unwrap(), &dir).unwrap();
        assert_eq!(entry.cached_key(), None);
        entry.record("abc-wasmtime48");
        let again = IndexEntry::new(&file, &fs::metadata(&file).unwrap(), &dir).unwrap();
        assert_eq!(again.cached_key().as_deref(), Some("abc-wasmtime48"));
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&file, b"second, longer").unwrap(); // a rebuilt guest
        let changed = IndexEntry::new(&file, &fs::metadata(&file).unwrap(), &dir).unwrap();
        assert_eq!(changed.cached_key(), None);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_compilation_goes_once_no_guest_file_names_it() {
        let dir = std::env::temp_dir().join(format!("cpy2py-sweep-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (first, second) = (dir.join("one.wasm"), dir.join("two.wasm"));
        for file in [&first, &second] {
            fs::write(file, b"the same build").unwrap();
            IndexEntry::new(file, &fs::metadata(file).unwrap(), &dir)
                .unwrap()
                .record("k1-wasmtime48");
        }
        let compiled = dir.join(cache_name("k1-wasmtime48"));
        fs::write(&compiled, b"compiled").unwrap();
        forget_guest(&first, &dir);
        assert!(compiled.exists(), "two.wasm still names it");
        forget_guest(&second, &dir);
        assert!(!compiled.exists(), "no guest file names it any more");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_new_build_of_a_guest_file_replaces_its_compilation() {
        let dir = std::env::temp_dir().join(format!("cpy2py-rebuilt-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("guest.wasm");
        let rt = runtime().unwrap();
        let mut compiled = Vec::new();
        for build in ["first", "second"] {
            // (compiled and indexed, then refused: it is no WASI command)
            let bytes =
                wat::parse_str(format!("(component (core module (func (export \"{build}\"))))")).unwrap();
            std::thread::sleep(Duration::from_millis(20)); // (another modification time)
            fs::write(&file, &bytes).unwrap();
            assert!(rt.load_guest(&file, &dir).is_err());
            compiled.push(dir.join(cache_name(&cache_key(&bytes, &rt.engine))));
        }
        assert!(!compiled[0].exists(), "the first build's compilation went");
        assert!(compiled[1].exists(), "the second build's is cached");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_that_is_no_component_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("cpy2py-notwasm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("guest.wasm");
        fs::write(&file, b"\0asm but not really").unwrap();
        let err = runtime()
            .unwrap()
            .load_guest(&file, &dir)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("just wasm"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
