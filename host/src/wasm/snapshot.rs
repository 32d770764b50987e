//! Snapshots of a guest taken after its `preload` imports: a new component
//! whose memory starts where an initialized guest's was, so that a guest
//! started from it has those modules already imported.
//!
//! wasmtime-wizer does the snapshot: it instruments the component so that
//! every core memory and mutable global can be read, we run the guest's
//! `preload` export in a store set up as for any guest (the same mounts and
//! limits, guest.rs `prepare`), and it writes their values back as the new
//! component's initial state.
//!
//! What must not go into a snapshot is what belongs to the store it was
//! taken in: the handles of WASI resources (the preopened directories, the
//! standard streams) that the C library and componentize-py's WASI adapter
//! keep in the guest's memory. componentize-py drops them at the end of its
//! own pre-initialization by calling two functions of those core modules;
//! a component does not export core functions, so `with_reset_exports`
//! lifts the two into component exports that we call after `preload`, just
//! before the snapshot. Each guest then asks for its handles again.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmparser::{
    CanonicalFunction, ComponentAlias, ComponentExternalKind, ComponentOuterAliasKind, ComponentTypeRef,
    Instance as CoreInstance, Parser, Payload,
};
use wasmtime::component::{Instance, Linker, WasmList};
use wasmtime::Store;
use wasmtime_wasi::I32Exit;
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::config::GuestConfig;
use super::end::GuestEnd;
use super::guest::{prepare, Prepared};
use super::imports::GuestState;
use super::output::Sink;
use super::runtime;
use crate::error::{HostError, Result};

/// The guest's export that imports the modules to snapshot (wasm/wit/world.wit).
const PRELOAD_EXPORT: &str = "preload";
/// The guest's export that lists the objects to make immortal in the
/// snapshot (wasm/wit/world.wit).
const IMMORTAL_EXPORT: &str = "immortal-objects";
/// How long the guest may take to name its objects for the snapshot after
/// its preload (cpy2py/kernel/snapshot_heap.py: well under a second for
/// hundreds of thousands of objects), whatever time the preload left.
const WALK_TIME: Duration = Duration::from_secs(5);
/// The smallest memory that is taken for the guest's heap: the other
/// memories of a componentize-py guest (its WASI adapter's) are a few pages.
const HEAP_MEMORY_MIN: usize = 1 << 20;
/// The core functions that drop the WASI handles a guest keeps (see the
/// module docs), and the component exports they get here.
const RESETS: [(&str, &str); 2] = [
    ("reset_adapter_state", "cpy2py-reset-adapter-state"),
    ("__wasilibc_reset_preopens", "cpy2py-reset-preopens"),
];

/// Runs the guest `config` describes up to its `preload` of `modules`, and
/// writes a snapshot of it to `out`, unless `cancel` is set meanwhile. The
/// preload is one call: the guest's `timeout` bounds it (`config.timeout`),
/// whether it runs or waits.
pub fn snapshot(
    config: &GuestConfig,
    modules: &[String],
    out: &Path,
    sink: Box<dyn Sink>,
    cancel: &AtomicBool,
) -> Result<()> {
    // wasmtime-wizer's accessors panic where they cannot read what they
    // must (its trait has no errors): the start fails, the process goes on
    let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        take(config, modules, out, sink, cancel)
    }));
    taken.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(HostError::Spawn(format!("cannot snapshot the guest: {what}")))
    })
}

fn take(
    config: &GuestConfig,
    modules: &[String],
    out: &Path,
    sink: Box<dyn Sink>,
    cancel: &AtomicBool,
) -> Result<()> {
    let spawn = |what: &str, e: &dyn std::fmt::Display| HostError::Spawn(format!("{what}: {e}"));
    let bytes = fs::read(&config.guest_file)
        .map_err(|e| spawn(&format!("cannot read {}", config.guest_file.display()), &e))?;
    let with_resets =
        with_reset_exports(&bytes).map_err(|e| spawn("this guest build cannot be snapshotted", &e))?;
    let wizer = Wizer::new();
    let (context, instrumented) = wizer
        .instrument_component(&with_resets)
        .map_err(|e| spawn("this guest build cannot be snapshotted", &e))?;
    let rt = runtime::runtime()?;
    // (compiled once per guest build, then loaded from the cache)
    let component = rt.instrumented(&instrumented, &config.cache_dir.join("wasm"))?;
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    if component.get_export_index(None, PRELOAD_EXPORT).is_none() {
        return Err(HostError::Spawn(format!(
            "this guest build cannot be snapshotted: it has no `{PRELOAD_EXPORT}` export (rebuild it with `just wasm`)"
        )));
    }
    let Prepared {
        shared,
        mut store,
        code,
        packages,
    } = prepare(config, sink)?;
    // (the ticker that reaches the epoch callback runs while it knows a guest)
    rt.register(&shared);
    // no master on the other end: reading the link gives its end at once,
    // writing a frame to it fails (a guest that tried would wait for ever)
    shared.to_guest.close();
    shared.from_guest.close();
    // the snapshot reads the whole memory in one call (the default allows 128 MiB)
    store.set_hostcall_fuel(config.memory_limit.saturating_mul(2));
    // the preload's limit on its running time (prepare's epoch callback
    // makes a running guest yield at every tick, so the timer reaches it
    // there as in a host call that waits)
    let deadline = config.timeout.map(|limit| Instant::now() + limit);
    let linker =
        runtime::guest_linker(&rt.engine).map_err(|e| spawn("cannot link the guest for its snapshot", &e))?;
    let taken = wasmtime_wasi::runtime::in_tokio(preload_and_snapshot(
        &wizer, &context, &linker, &component, &mut store, modules, deadline, cancel,
    ));
    drop(store);
    drop(code);
    drop(packages);
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled()); // (nothing is written)
    }
    let snapshot = match taken {
        Ok(Ok(taken)) => taken,
        // what the guest did: its import failed, or it was stopped
        Ok(Err(failure)) => {
            let tail = shared.output.stderr_tail();
            let said = if tail.is_empty() {
                String::new()
            } else {
                format!("; it said:\n{tail}")
            };
            return Err(HostError::Spawn(match shared.stop_reason() {
                Some(end) => format!("the preload stopped the guest: it {}{said}", end.describe()),
                None => format!("the preload failed in the guest: {failure}"),
            }));
        }
        Err(err) => return Err(spawn("cannot snapshot the guest", &format!("{err:#}"))),
    };
    write_atomically(out, &snapshot)
        .map_err(|e| spawn(&format!("cannot write the snapshot {}", out.display()), &e))
}

/// How often a running preload looks whether it was cancelled (Ctrl-C in
/// the master while it waits for the snapshot).
const CANCEL_SLICE: Duration = Duration::from_millis(50);

fn cancelled() -> HostError {
    HostError::Spawn("the snapshot was cancelled".into())
}

/// Runs the guest's `preload` of `modules` (up to `deadline`, or until
/// `cancel` is set), drops its WASI handles and takes the snapshot: the new
/// component, or what made the preload fail.
#[allow(clippy::too_many_arguments)]
async fn preload_and_snapshot(
    wizer: &Wizer,
    context: &wasmtime_wizer::ComponentContext<'_>,
    linker: &Linker<GuestState>,
    component: &wasmtime::component::Component,
    store: &mut Store<GuestState>,
    modules: &[String],
    deadline: Option<Instant>,
    cancel: &AtomicBool,
) -> wasmtime::Result<std::result::Result<Vec<u8>, String>> {
    let instance = linker.instantiate_async(&mut *store, component).await?;
    type Preload = (std::result::Result<(), String>,);
    let preload = instance.get_typed_func::<(Vec<String>,), Preload>(&mut *store, PRELOAD_EXPORT)?;
    let called = match bounded(
        preload.call_async(&mut *store, (modules.to_vec(),)),
        deadline,
        cancel,
    )
    .await
    {
        Bounded::Done(called) => called,
        Bounded::Cancelled => return Ok(Err("cancelled".into())),
        Bounded::TimedOut => return Ok(Err(timed_out(store))),
    };
    match called {
        Ok((Ok(()),)) => {}
        Ok((Err(failure),)) => return Ok(Err(failure)),
        Err(trap) => {
            return Ok(Err(match trap.downcast_ref::<I32Exit>() {
                // (os._exit at import: the backtrace of the exit says nothing more)
                Some(exit) => format!("it exited with status {} while importing its preload", exit.0),
                None => format!("{trap:#}"), // (a limit, or a crash of the guest)
            }));
        }
    }
    // the guest's own code still (a preload may have replaced it), bounded
    // as well; it failing is no failure of the preload: no snapshot is made
    // then, and the twin's guests import their preload themselves
    let immortal = match instance.get_typed_func::<(), ((u32, Vec<u8>),)>(&mut *store, IMMORTAL_EXPORT) {
        Err(_) => None, // (a guest build without the export)
        Ok(objects) => {
            let walk_deadline = Instant::now() + WALK_TIME;
            match bounded(objects.call_async(&mut *store, ()), Some(walk_deadline), cancel).await {
                Bounded::Done(Ok(((count, words),))) => Some(ImmortalObjects::new(count, &words)),
                Bounded::Done(Err(trap)) => {
                    return Err(wasmtime::Error::msg(format!(
                        "the guest failed to name its objects for the snapshot: {trap:#}"
                    )));
                }
                Bounded::Cancelled => return Ok(Err("cancelled".into())),
                Bounded::TimedOut => {
                    return Err(wasmtime::Error::msg(format!(
                        "the guest did not name its objects for the snapshot within {} s",
                        WALK_TIME.as_secs()
                    )));
                }
            }
        }
    };
    for (_, export) in RESETS {
        let reset = instance.get_typed_func::<(), ()>(&mut *store, export)?;
        reset.call_async(&mut *store, ()).await?;
    }
    let snapshot = wizer
        .snapshot_component(
            context,
            &mut Taken {
                store,
                instance,
                immortal,
            },
        )
        .await?;
    Ok(Ok(snapshot))
}

fn write_atomically(out: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, out)
}

/// How a call of the guest's that `bounded` waited for ended.
enum Bounded<T> {
    Done(T),
    Cancelled,
    TimedOut,
}

/// Waits for `call` (of a guest export) until `deadline`, or until `cancel`
/// is set; the call is dropped then (a running guest yields at every epoch
/// tick, see prepare, so the timer reaches it).
async fn bounded<T>(
    call: impl std::future::Future<Output = T>,
    deadline: Option<Instant>,
    cancel: &AtomicBool,
) -> Bounded<T> {
    let mut call = std::pin::pin!(call);
    loop {
        let wake = Instant::now() + CANCEL_SLICE;
        let wake = deadline.map_or(wake, |deadline| deadline.min(wake));
        match tokio::time::timeout_at(wake.into(), call.as_mut()).await {
            Ok(done) => return Bounded::Done(done),
            Err(_) if cancel.load(Ordering::SeqCst) => return Bounded::Cancelled,
            Err(_) if deadline.is_some_and(|deadline| Instant::now() >= deadline) => {
                return Bounded::TimedOut
            }
            Err(_) => {}
        }
    }
}

/// Stops the guest of `store` for its timeout; what the snapshot says of it.
fn timed_out(store: &Store<GuestState>) -> String {
    let shared = &store.data().shared;
    shared.stop(GuestEnd::Timeout(shared.timeout.unwrap_or_default()));
    "the guest ran past its timeout".into()
}

/// What the guest's `immortal-objects` gave: the reference count that
/// makes a CPython object immortal and the addresses of the objects to give
/// it in the snapshot (cpy2py/kernel/snapshot_heap.py; see `write`), and the
/// accessor of the memory they are written to once one was read.
struct ImmortalObjects {
    count: u32,
    addresses: Vec<u32>,
    heap: Option<String>,
}

impl ImmortalObjects {
    /// From the count and the addresses as little-endian words.
    fn new(count: u32, words: &[u8]) -> Self {
        let addresses = words
            .chunks_exact(4)
            .map(|word| u32::from_le_bytes(word.try_into().expect("four bytes")))
            .collect();
        ImmortalObjects {
            count,
            addresses,
            heap: None,
        }
    }

    /// The guest's memory `memory` (its heap, where the addresses point)
    /// with `count` written over the reference count of each object, a
    /// little-endian word at its address. Only a word that holds a count
    /// below it (at least one) is written: a sanity check, not a proof that
    /// an object lives there (a free block's first word passes it too);
    /// whatever the guest names, only its own memory in this snapshot is
    /// written. Returns the memory and how many words were written.
    fn write(&self, memory: &[u8]) -> (Vec<u8>, usize) {
        let mut memory = memory.to_vec();
        let mut written = 0;
        for &address in &self.addresses {
            let at = address as usize;
            let Some(word) = memory.get_mut(at..at.saturating_add(4)) else {
                continue;
            };
            let old = u32::from_le_bytes(word.try_into().expect("four bytes"));
            if (1..self.count).contains(&old) {
                word.copy_from_slice(&self.count.to_le_bytes());
                written += 1;
            }
        }
        (memory, written)
    }
}

/// The instrumented guest as wasmtime-wizer reads it: each accessor is a
/// function of the instance `instance` exports; `immortal`: the objects to
/// make immortal in the memory of the guest's heap (CPython's), the one
/// memory of at least `HEAP_MEMORY_MIN` bytes.
struct Taken<'a> {
    store: &'a mut Store<GuestState>,
    instance: Instance,
    immortal: Option<ImmortalObjects>,
}

impl Taken<'_> {
    async fn call<R: wasmtime::component::Lift + 'static>(&mut self, instance: &str, func: &str) -> R {
        let accessors = self.instance.get_export_index(&mut *self.store, None, instance);
        let index = self
            .instance
            .get_export_index(&mut *self.store, accessors.as_ref(), func);
        let func = index
            .and_then(|index| {
                self.instance
                    .get_typed_func::<(), (R,)>(&mut *self.store, index)
                    .ok()
            })
            .unwrap_or_else(|| panic!("wasmtime-wizer's accessor {instance}#{func} is missing"));
        // the accessors only read a global or a memory: they cannot fail
        func.call_async(&mut *self.store, ())
            .await
            .expect("a snapshot accessor trapped")
            .0
    }
}

impl ComponentInstanceState for Taken<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        let list: WasmList<u8> = self.call(instance, func).await;
        let memory = list.as_le_slice(&*self.store);
        let Some(immortal) = self.immortal.as_mut().filter(|_| memory.len() >= HEAP_MEMORY_MIN) else {
            return contents(memory);
        };
        // (wasmtime-wizer reads a memory more than once: the same one each time)
        let accessor = format!("{instance}#{func}");
        if *immortal.heap.get_or_insert_with(|| accessor.clone()) != accessor {
            panic!(
                "the guest has more than one memory of its heap's size: which one is its heap is not known"
            );
        }
        let (written, count) = immortal.write(memory);
        tracing::debug!(
            count,
            of = immortal.addresses.len(),
            "objects made immortal in the snapshot"
        );
        contents(&written);
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func).await.to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func).await.to_bits()
    }
}

/// The component `bytes` with the core functions of `RESETS` lifted into
/// component exports of type `func()`. They are found in the core modules
/// the component instantiates; the new sections go at its end, so no index
/// it already uses changes.
pub fn with_reset_exports(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut spaces = IndexSpaces::default();
    let mut module_exports: Vec<Vec<String>> = Vec::new();
    let mut instantiations: Vec<Option<u32>> = Vec::new(); // core instance -> module
    let mut depth = 0u32;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| e.to_string())?;
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => {
                if depth == 0 && matches!(payload, Payload::ModuleSection { .. }) {
                    module_exports.push(Vec::new());
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ExportSection(reader) if depth == 1 => {
                let exports = module_exports
                    .last_mut()
                    .ok_or("an export section outside a module")?;
                for export in reader {
                    exports.push(export.map_err(|e| e.to_string())?.name.to_string());
                }
            }
            _ if depth > 0 => {}
            payload => spaces
                .count(payload, &mut instantiations)
                .map_err(|e| e.to_string())?,
        }
    }
    let mut aliases = wasm_encoder::ComponentAliasSection::new();
    for (core_name, _) in RESETS {
        let instance = instantiations
            .iter()
            .position(|module| {
                module.is_some_and(|m| {
                    module_exports
                        .get(m as usize)
                        .is_some_and(|e| e.iter().any(|n| n == core_name))
                })
            })
            .ok_or_else(|| format!("no core module of the guest exports {core_name}"))?;
        aliases.alias(wasm_encoder::Alias::CoreInstanceExport {
            instance: instance as u32,
            kind: wasm_encoder::ExportKind::Func,
            name: core_name,
        });
    }
    let mut types = wasm_encoder::ComponentTypeSection::new();
    types
        .function()
        .params(std::iter::empty::<(&str, wasm_encoder::ComponentValType)>())
        .result(None);
    let mut lifts = wasm_encoder::CanonicalFunctionSection::new();
    let mut exports = wasm_encoder::ComponentExportSection::new();
    for (i, (_, export)) in RESETS.iter().enumerate() {
        let i = i as u32;
        lifts.lift(
            spaces.core_funcs + i,
            spaces.types,
            std::iter::empty::<wasm_encoder::CanonicalOption>(),
        );
        exports.export(
            *export,
            wasm_encoder::ComponentExportKind::Func,
            spaces.funcs + i,
            None,
        );
    }
    let mut appended = wasm_encoder::Component::new();
    appended
        .section(&types)
        .section(&aliases)
        .section(&lifts)
        .section(&exports);
    let appended = appended.finish();
    let header = wasm_encoder::Component::new().finish().len();
    let mut out = bytes.to_vec();
    out.extend_from_slice(&appended[header..]); // (wasmtime-wizer validates the result)
    Ok(out)
}

/// How many items of the index spaces we append to a component defines
/// (at its top level).
#[derive(Default)]
struct IndexSpaces {
    types: u32,
    funcs: u32,
    core_funcs: u32,
}

impl IndexSpaces {
    fn count(
        &mut self,
        payload: Payload<'_>,
        instantiations: &mut Vec<Option<u32>>,
    ) -> wasmparser::Result<()> {
        match payload {
            Payload::InstanceSection(reader) => {
                for instance in reader {
                    instantiations.push(match instance? {
                        CoreInstance::Instantiate { module_index, .. } => Some(module_index),
                        CoreInstance::FromExports(_) => None,
                    });
                }
            }
            Payload::ComponentTypeSection(reader) => self.types += reader.count(),
            Payload::ComponentImportSection(reader) => {
                for import in reader {
                    match import?.ty {
                        ComponentTypeRef::Type(_) => self.types += 1,
                        ComponentTypeRef::Func(_) => self.funcs += 1,
                        _ => {}
                    }
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader {
                    match export?.kind {
                        ComponentExternalKind::Type => self.types += 1,
                        ComponentExternalKind::Func => self.funcs += 1,
                        _ => {}
                    }
                }
            }
            Payload::ComponentAliasSection(reader) => {
                for alias in reader {
                    match alias? {
                        ComponentAlias::InstanceExport {
                            kind: ComponentExternalKind::Type,
                            ..
                        }
                        | ComponentAlias::Outer {
                            kind: ComponentOuterAliasKind::Type,
                            ..
                        } => self.types += 1,
                        ComponentAlias::InstanceExport {
                            kind: ComponentExternalKind::Func,
                            ..
                        } => self.funcs += 1,
                        ComponentAlias::CoreInstanceExport {
                            kind: wasmparser::ExternalKind::Func,
                            ..
                        } => self.core_funcs += 1,
                        _ => {}
                    }
                }
            }
            Payload::ComponentCanonicalSection(reader) => {
                for function in reader {
                    match function? {
                        CanonicalFunction::Lift { .. } => self.funcs += 1,
                        // every other canonical function defines a core function
                        _ => self.core_funcs += 1,
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two core modules with the functions of `RESETS` (the C library's
    /// traps, to tell them apart), and a function and an export before them
    /// in the index spaces.
    const COMPONENT: &str = r#"
        (component
          (type (func))
          (core module $adapter (func (export "reset_adapter_state")))
          (core module $libc (func (export "__wasilibc_reset_preopens") unreachable))
          (core instance $libc (instantiate $libc))
          (core instance $adapter (instantiate $adapter))
          (func $first (type 0) (canon lift (core func $adapter "reset_adapter_state")))
          (export "first" (func $first))
        )"#;

    #[test]
    fn the_reset_functions_become_exports_that_call_them() {
        let bytes = wat::parse_str(COMPONENT).unwrap();
        let with_resets = with_reset_exports(&bytes).unwrap();
        let engine = wasmtime::Engine::default();
        let component = wasmtime::component::Component::new(&engine, &with_resets).unwrap();
        let mut store = Store::new(&engine, ());
        let instance = Linker::<()>::new(&engine)
            .instantiate(&mut store, &component)
            .unwrap();
        let call = |store: &mut Store<()>, name: &str| {
            let func = instance.get_typed_func::<(), ()>(&mut *store, name).unwrap();
            func.call(&mut *store, ())
        };
        call(&mut store, "cpy2py-reset-adapter-state").unwrap();
        let trapped = call(&mut store, "cpy2py-reset-preopens").unwrap_err();
        assert!(trapped.downcast_ref::<wasmtime::Trap>().is_some(), "{trapped:?}");
    }

    #[test]
    fn a_component_without_them_cannot_be_snapshotted() {
        let bytes = wat::parse_str("(component (core module $m (func (export \"reset_adapter_state\"))) (core instance (instantiate $m)))").unwrap();
        let err = with_reset_exports(&bytes).unwrap_err();
        assert!(err.contains("__wasilibc_reset_preopens"), "{err}");
    }

    /// A memory of little-endian words, and the objects at some of them.
    fn immortal(words: &[u32], addresses: &[u32]) -> (Vec<u8>, ImmortalObjects) {
        let memory = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        let objects = ImmortalObjects {
            count: 5 << 28,
            addresses: addresses.to_vec(),
            heap: None,
        };
        (memory, objects)
    }

    fn words(memory: &[u8]) -> Vec<u32> {
        memory
            .chunks_exact(4)
            .map(|word| u32::from_le_bytes(word.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_immortal_count_is_written_over_each_objects_count() {
        let (memory, objects) = immortal(&[7, 1, 0xdead, 3, 9], &[0, 4, 12]);
        let (written, count) = objects.write(&memory);
        assert_eq!(words(&written), [5 << 28, 5 << 28, 0xdead, 5 << 28, 9]);
        assert_eq!(count, 3);
    }

    #[test]
    fn a_word_that_is_no_mortal_count_or_lies_outside_the_memory_is_left_alone() {
        // a zero, an immortal count, a larger word, an
        // address past the end, and one whose word would run past it
        let (memory, objects) = immortal(&[0, 5 << 28, u32::MAX, 2], &[0, 4, 8, 16, 14, u32::MAX]);
        let (written, count) = objects.write(&memory);
        assert_eq!(words(&written), [0, 5 << 28, u32::MAX, 2]);
        assert_eq!(count, 0);
    }
}
