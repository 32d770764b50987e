//! A guest's read of its memory image maps one page, not the 64 KiB around it.
//!
//! A guest's memory starts as a copy-on-write mapping of its image, in the
//! compiled guest file. Linux answers a read fault in a file mapping by
//! mapping the pages around it as well ("fault-around", 64 KiB by default),
//! and RSS counts those pages for every guest again: an idle guest that had
//! read 1.2 MiB of its image held 8 MiB of it. A mapping registered with a
//! userfaultfd for write protection gets no fault-around (Linux's
//! `should_fault_around`). Registered in the asynchronous mode
//! (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7), with no page ever protected, no
//! fault reaches a handler and nothing else changes.
//!
//! wasmtime maps a pool slot's image when the slot gets a guest of another
//! file, so the host registers the whole memory pool of the pooling
//! allocator after each instantiation. The kernel walks the pool's mappings
//! (a few per slot ever used) and skips those registered before: about 2
//! us with 10 slots used, 200 us with 1,000. Registered mappings also get
//! no transparent huge pages (the guest image is a file mapping, which has
//! none anyway). Where userfaultfd is refused (a seccomp filter, an older
//! kernel, no pool), guests run as before: only their RSS is larger.

use std::fs;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` and `_IOWR(0xAA, 0x00, struct uffdio_register)`
const UFFDIO_API: libc::c_ulong = ioctl_rw(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioctl_rw(0x00, std::mem::size_of::<UffdioRegister>());

const fn ioctl_rw(nr: u64, size: usize) -> libc::c_ulong {
    ((3 << 30) | ((size as u64) << 16) | (UFFD_API << 8) | nr) as libc::c_ulong
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// The process's userfaultfd in the asynchronous write-protect mode, or
/// None where it cannot be had (said once in the log).
fn userfaultfd() -> Option<&'static OwnedFd> {
    static FD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    FD.get_or_init(|| match open_userfaultfd() {
        Ok(fd) => Some(fd),
        Err(why) => {
            tracing::debug!("guests' read faults map 64 KiB each (no userfaultfd: {why})");
            None
        }
    })
    .as_ref()
}

fn open_userfaultfd() -> Result<OwnedFd, String> {
    // SAFETY: a plain system call; the descriptor it returns is owned here
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
    if raw < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the system call just returned this descriptor
    let fd = unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the struct given, of its size
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
        return Err(format!(
            "UFFDIO_API with WP_ASYNC: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// Registers the mappings in `region` (page-aligned) for asynchronous write
/// protection, which turns fault-around off in them; false if it could not.
pub fn narrow(region: &Range<usize>) -> bool {
    let Some(fd) = userfaultfd() else {
        return false;
    };
    let mut register = UffdioRegister {
        start: region.start as u64,
        len: (region.end - region.start) as u64,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes the struct given, of its size;
    // in this mode it changes no page of the region
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } == 0;
    if !done {
        tracing::debug!(
            "cannot register the guests' memory pool with userfaultfd: {}",
            std::io::Error::last_os_error()
        );
    }
    done
}

/// The smallest reservation taken for the memory pool (each of its slots
/// reserves gigabytes of address space)
const MIN_POOL: usize = 1 << 30;

/// What `make` returns, and the largest anonymous mapping without access
/// that appeared while it ran: the memory pool the pooling allocator
/// reserves when its engine is made.
pub fn with_new_reservation<T>(make: impl FnOnce() -> T) -> (T, Option<Range<usize>>) {
    let before = reservations();
    let made = make();
    let after = reservations();
    let new = after
        .into_iter()
        .filter(|r| !before.contains(r) && r.end - r.start >= MIN_POOL)
        .max_by_key(|r| r.end - r.start);
    (made, new)
}

/// The process's anonymous mappings without access (`---p`, no file).
fn reservations() -> Vec<Range<usize>> {
    let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let inode = fields.nth(2)?;
            if perms != "---p" || inode != "0" || fields.next().is_some() {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::runtime::runtime;
    use wasmtime::{Instance, Module, Store};

    /// The flags and resident kilobytes of the mapping that holds `address`.
    fn mapping_of(address: usize) -> (String, u64) {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut rss = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line
                .split_once(' ')
                .filter(|(r, _)| r.contains('-') && !r.ends_with(':'))
            {
                let (start, end) = range.split_once('-').unwrap();
                let (start, end) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16));
                inside = matches!((start, end), (Ok(s), Ok(e)) if s <= address && address < e);
            } else if inside && line.starts_with("Rss:") {
                rss = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            } else if inside && line.starts_with("VmFlags:") {
                return (line.to_string(), rss);
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    /// A module whose memory image (4 MiB of 'x' from address 0) comes, as
    /// a guest's does, from its compiled file: `touch` reads a byte,
    /// `scribble` overwrites the image and grows the memory by a page of
    /// 0xA5.
    fn file_backed_module(engine: &wasmtime::Engine, name: &str) -> Module {
        let data = "x".repeat(4 << 20);
        let wat = format!(
            r#"(module
                (memory (export "memory") 80)
                (data (i32.const 0) "{data}")
                (func (export "touch") (param i32) (result i32) (i32.load8_u (local.get 0)))
                (func (export "scribble")
                    (memory.fill (i32.const 0) (i32.const 0x5A) (i32.const 0x400000))
                    (drop (memory.grow (i32.const 1)))
                    (memory.fill (i32.const 0x500000) (i32.const 0xA5) (i32.const 65536))))"#
        );
        let module = Module::new(engine, wat::parse_str(wat).unwrap()).unwrap();
        let file = std::env::temp_dir().join(format!("cpy2py-{name}-{}.cwasm", std::process::id()));
        fs::write(&file, module.serialize().unwrap()).unwrap();
        // SAFETY: the file was just written by this engine and is not changed
        let module = unsafe { Module::deserialize_file(engine, &file) }.unwrap();
        let _ = fs::remove_file(&file); // (mapped: it stays readable)
        module
    }

    fn instantiate(engine: &wasmtime::Engine, module: &Module) -> (Store<()>, Instance, wasmtime::Memory) {
        let mut store = Store::new(engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = Instance::new(&mut store, module, &[]).unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        (store, instance, memory)
    }

    fn userfaultfd_here() -> bool {
        match open_userfaultfd() {
            Ok(_) => true,
            Err(why) => {
                eprintln!("skipped: no userfaultfd here ({why}); guests keep the kernel's fault-around");
                false
            }
        }
    }

    /// A guest's memory image read at 16 places 256 KiB apart: with the pool
    /// registered, 16 pages become resident, not the 16 x 64 KiB around them.
    #[test]
    fn a_read_of_a_pooled_memory_image_maps_its_own_page_only() {
        if !userfaultfd_here() {
            return;
        }
        let rt = runtime().unwrap();
        assert!(rt.pooled, "the pooling allocator is in use");
        let module = file_backed_module(&rt.engine, "fault-around");
        let (mut store, instance, memory) = instantiate(&rt.engine, &module);
        assert!(rt.narrow_read_faults(), "the memory pool was registered");
        let base = memory.data_ptr(&store) as usize;
        let (flags, before) = mapping_of(base);
        assert!(flags.split_whitespace().any(|f| f == "uw"), "{flags}");
        let touch = instance.get_typed_func::<i32, i32>(&mut store, "touch").unwrap();
        for at in 0..16 {
            assert_eq!(
                touch.call(&mut store, at * (256 << 10) + 4096).unwrap(),
                i32::from(b'x')
            );
        }
        let (_, after) = mapping_of(base);
        assert!(
            after - before <= 16 * 4,
            "16 reads made {} KiB resident",
            after - before
        );
    }

    /// A registered pool slot that another instance gets back holds the
    /// initial image again: what the previous one wrote over its image and
    /// in the memory it grew is gone.
    #[test]
    fn a_registered_pool_slot_is_reset_for_the_next_instance() {
        if !userfaultfd_here() {
            return;
        }
        let rt = runtime().unwrap();
        let module = file_backed_module(&rt.engine, "fault-around-reset");
        let (mut store, instance, memory) = instantiate(&rt.engine, &module);
        assert!(rt.narrow_read_faults());
        let first_base = memory.data_ptr(&store) as usize;
        let scribble = instance.get_typed_func::<(), ()>(&mut store, "scribble").unwrap();
        scribble.call(&mut store, ()).unwrap();
        assert_eq!(memory.data(&store)[4096], 0x5A);
        drop(store);

        let (mut store, _instance, memory) = instantiate(&rt.engine, &module);
        assert!(rt.narrow_read_faults());
        assert_eq!(
            memory.data_ptr(&store) as usize,
            first_base,
            "the second instance must get the same pool slot, or this test shows nothing"
        );
        assert_eq!(memory.data_size(&store), 80 * 65536, "the grown page is gone");
        let data = memory.data(&store);
        assert!(data[..4 << 20].iter().all(|&b| b == b'x'), "the image is back");
        assert!(data[4 << 20..].iter().all(|&b| b == 0), "the rest is zero");
        let _ = memory.grow(&mut store, 1).unwrap();
        assert!(
            memory.data(&store)[0x500000..].iter().all(|&b| b == 0),
            "grown again: zero"
        );
    }
}
