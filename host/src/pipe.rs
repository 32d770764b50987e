//! Waiting on and writing to the pipes of a native twin, in steps that end
//! when a signal arrives or a slice of time passes, so that the caller (the
//! pyo3 layer, with the GIL released) can let Python's signal handlers run
//! (Ctrl-C) between steps without losing or tearing a frame.
//!
//! Reading goes through the one frame reader, `protocol::frame::FrameReader`.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// `timeout` for `ppoll`: to the nanosecond (poll's milliseconds made a
/// wait of 200 us no wait at all).
fn timespec(timeout: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    }
}

/// One `poll` of `fds` for `events`, up to `timeout` (None: forever);
/// `None` when a signal interrupted it, else each descriptor's `revents`
/// (all 0: the timeout passed).
pub(crate) fn poll_all<const N: usize>(
    fds: [RawFd; N],
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<Option<[libc::c_short; N]>> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    let limit = timeout.map(timespec);
    let limit_ptr = limit
        .as_ref()
        .map_or(std::ptr::null(), |limit| limit as *const libc::timespec);
    // SAFETY: N pollfds and a timespec that live for the call; no mask:
    // the thread's own stays
    let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), N as libc::nfds_t, limit_ptr, std::ptr::null()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(pfds.map(|pfd| pfd.revents)))
}

/// One `poll` of `fd` for `events`; `None` when a signal interrupted it,
/// else the `revents` (0: the timeout passed).
fn poll_once(
    fd: RawFd,
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<Option<libc::c_short>> {
    Ok(poll_all([fd], events, timeout)?.map(|[revents]| revents))
}

/// Waits until `fd` is readable (or hung up), up to `timeout` (None:
/// forever); `None` when a signal interrupted the wait.
pub fn poll_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<Option<bool>> {
    Ok(poll_once(fd, libc::POLLIN, timeout)?.map(|revents| revents != 0))
}

/// `poll_readable`, ended sooner (`Some(false)`) when `unless` becomes
/// readable first: an event loop's selector, which is when that loop has
/// something to do.
pub fn poll_readable_unless(fd: RawFd, unless: RawFd, timeout: Option<Duration>) -> io::Result<Option<bool>> {
    Ok(poll_all([fd, unless], libc::POLLIN, timeout)?.map(|[revents, _]| revents != 0))
}

/// Waits until `fd` is readable while this thread blocks its signals,
/// letting them through during the wait only (`ppoll` with `unblocked`, the
/// mask from before they were held): `false` when one arrived first (nothing
/// was read; the caller lets its handler run). With no held mask, `true` at
/// once: the read itself waits, and a signal interrupts it.
pub fn wait_for_frame(fd: RawFd, unblocked: Option<&libc::sigset_t>) -> io::Result<bool> {
    let Some(unblocked) = unblocked else {
        return Ok(true);
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives for the call, and a valid signal mask
    let n = unsafe { libc::ppoll(&mut pfd, 1, std::ptr::null(), unblocked) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(true)
}

/// Whether `len` bytes written to the pipe `fd` now (by its only writer)
/// would all go out at once: counted in the pipe's pages, as the kernel
/// fills them, with the unread bytes taking one page more than they fill
/// (the first and last may be part-filled). False for a descriptor that is
/// not a pipe (a socket).
pub fn pipe_has_room(fd: RawFd, len: usize) -> bool {
    // SAFETY: queries of a descriptor the caller owns
    let capacity = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    let mut unread: libc::c_int = 0;
    if capacity <= 0 || unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } < 0 {
        return false;
    }
    // SAFETY: no arguments to check
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let pages = |bytes: usize| bytes.div_ceil(page);
    pages(unread.max(0) as usize) + 1 + pages(len) <= capacity as usize / page
}

/// Makes the descriptor `fd` (owned by the caller) non-blocking: a write to
/// a full pipe then fails with EAGAIN instead of waiting.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: flags of a descriptor the caller owns
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes what is left of a frame, `head` and then `parts` (`done` bytes of
/// them were written before), to the non-blocking
/// `fd` until it is all written (`true`), or `slice` passed without room in
/// the pipe, or a signal came (`false`: `done` says how far it got, and the
/// caller lets signal handlers run before going on). Room in the pipe is the
/// common case: one `writev`.
pub fn write_some(
    fd: RawFd,
    head: &[u8],
    parts: &[&[u8]],
    done: &mut usize,
    slice: Duration,
) -> io::Result<bool> {
    let total = head.len() + parts.iter().map(|part| part.len()).sum::<usize>();
    while *done < total {
        let (iov, count) = iovecs_after(head, parts, *done);
        // SAFETY: `count` iovecs over live slices, for the duration of the call
        let n = unsafe { libc::writev(fd, iov.as_ptr(), count as libc::c_int) };
        if n >= 0 {
            *done += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => return Ok(false),
            io::ErrorKind::WouldBlock => {}
            _ => return Err(err),
        }
        // the pipe is full: wait for room, for at most a slice; no room yet,
        // or a signal: a chance for Ctrl-C
        if poll_once(fd, libc::POLLOUT, Some(slice))?.unwrap_or(0) == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The most iovecs one `writev` takes here (far below `IOV_MAX`; a frame of
/// more parts goes out in several calls).
const MAX_IOVECS: usize = 16;

/// iovecs over what of `head` and `parts` comes after their first `done`
/// bytes (empty parts left out), and how many of them there are.
fn iovecs_after(head: &[u8], parts: &[&[u8]], mut done: usize) -> ([libc::iovec; MAX_IOVECS], usize) {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOVECS];
    let mut count = 0;
    for part in std::iter::once(head).chain(parts.iter().copied()) {
        if done >= part.len() {
            done -= part.len();
            continue;
        }
        iov[count] = libc::iovec {
            iov_base: part[done..].as_ptr() as *mut _,
            iov_len: part.len() - done,
        };
        done = 0;
        count += 1;
        if count == MAX_IOVECS {
            break;
        }
    }
    (iov, count)
}

/// Writes `message` (at most `PIPE_BUF` bytes, so all or nothing) to the
/// pipe `fd` unless it stays full until `deadline`; never blocks past it.
/// The caller holds the writer lock: no other write is under way.
pub fn write_small_before(fd: RawFd, message: &[u8], deadline: Instant) -> io::Result<bool> {
    debug_assert!(message.len() <= libc::PIPE_BUF);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let revents = match poll_once(fd, libc::POLLOUT, Some(left))? {
            None => continue,
            Some(0) => return Ok(false), // still full at the deadline
            Some(revents) => revents,
        };
        if revents & (libc::POLLERR | libc::POLLHUP) != 0 && revents & libc::POLLOUT == 0 {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        // poll said there is room; MSG_DONTWAIT does not apply to pipes, so
        // the write is made non-blocking for this one call
        // SAFETY: flags of a descriptor the caller owns
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        // SAFETY: a live slice, for the duration of the call
        let written = unsafe { libc::write(fd, message.as_ptr().cast(), message.len()) };
        let err = io::Error::last_os_error();
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        if written >= 0 {
            debug_assert_eq!(
                written as usize,
                message.len(),
                "pipe writes up to PIPE_BUF are atomic"
            );
            return Ok(true);
        }
        match err.kind() {
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock if Instant::now() < deadline => continue,
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// The right to write frames to a twin, held by one thread from the first
/// byte of a frame to its last, also while that thread lets the GIL go
/// between slices of a long write (a guard could not travel there).
#[derive(Default)]
pub struct WriterLock {
    state: Mutex<Writers>,
    freed: Condvar,
}

/// Whether a writer holds the lock, and how many wait for it (a release
/// wakes one only if any waits: a wake-up is a system call even for nobody).
#[derive(Default)]
struct Writers {
    busy: bool,
    waiting: usize,
}

impl WriterLock {
    fn state(&self) -> std::sync::MutexGuard<'_, Writers> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn acquire(&self) {
        let mut state = self.state();
        state.waiting += 1;
        while state.busy {
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
        state.busy = true;
    }

    /// Takes it if it is free; whether it did.
    pub fn try_acquire(&self) -> bool {
        !std::mem::replace(&mut self.state().busy, true)
    }

    /// Takes it unless it stays taken until `deadline`; whether it did.
    pub fn acquire_before(&self, deadline: Instant) -> bool {
        let mut state = self.state();
        state.waiting += 1;
        while state.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.waiting -= 1;
                return false;
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.waiting -= 1;
        state.busy = true;
        true
    }

    pub fn release(&self) {
        let mut state = self.state();
        state.busy = false;
        if state.waiting > 0 {
            self.freed.notify_one();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A pipe (read end, write end), the write end non-blocking like the
    /// master's end towards a twin.
    pub(crate) fn pipe(nonblocking_write: bool) -> (File, File) {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        if nonblocking_write {
            unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
        }
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    /// Fills the non-blocking `write` end; how many bytes it took.
    fn fill(write: &File) -> usize {
        let chunk = [0u8; 65536];
        let mut total = 0;
        loop {
            let n = unsafe { libc::write(write.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
            if n < 0 {
                assert_eq!(io::Error::last_os_error().kind(), io::ErrorKind::WouldBlock);
                return total;
            }
            total += n as usize;
        }
    }

    extern "C" fn nothing(_: libc::c_int) {}

    /// A handler for SIGUSR2 without SA_RESTART, so that it interrupts waits.
    pub(crate) fn interrupting_signal() -> libc::c_int {
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
        }
        libc::SIGUSR2
    }

    /// Sends `signal` to the thread of `handle` every few ms until `done`.
    pub(crate) fn pester(thread: libc::pthread_t, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let signal = interrupting_signal();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                unsafe { libc::pthread_kill(thread, signal) };
            }
        })
    }

    #[test]
    fn a_frame_is_written_with_one_writev_when_there_is_room() {
        let (mut read, write) = pipe(true);
        let mut done = 0;
        assert!(write_some(
            write.as_raw_fd(),
            &[0, 0, 0, 3],
            &[b"abc"],
            &mut done,
            Duration::from_secs(1)
        )
        .unwrap());
        assert_eq!(done, 7);
        let mut got = [0u8; 7];
        read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x03abc");
    }

    #[test]
    fn a_full_pipe_ends_the_slice_and_the_write_goes_on_where_it_stopped() {
        let (mut read, write) = pipe(true);
        let room = fill(&write);
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let header = [0, 1, 0x86, 0xa0];
        let mut done = 0;
        // EAGAIN, then a slice without room: false, nothing written
        let started = Instant::now();
        assert!(!write_some(
            write.as_raw_fd(),
            &header,
            &[&payload],
            &mut done,
            Duration::from_millis(30)
        )
        .unwrap());
        assert!(started.elapsed() >= Duration::from_millis(25));
        assert_eq!(done, 0);
        // a reader drains the pipe; the write goes on from `done` until whole
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; room + header.len() + 100_000];
            read.read_exact(&mut all).unwrap();
            all.split_off(room)
        });
        while !write_some(
            write.as_raw_fd(),
            &header,
            &[&payload],
            &mut done,
            Duration::from_millis(30),
        )
        .unwrap()
        {}
        assert_eq!(done, header.len() + payload.len());
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], &header);
        assert_eq!(&got[4..], &payload[..]);
    }

    #[test]
    fn a_frame_of_many_parts_goes_out_whole_and_in_order_through_a_full_pipe() {
        let (mut read, write) = pipe(true);
        let room = fill(&write);
        // more parts than one writev takes, of every size, some empty
        let parts: Vec<Vec<u8>> = (0..40u32)
            .map(|i| (0..(i * 7919) % 70_000).map(|j| (i + j) as u8).collect())
            .collect();
        let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let head = [1u8, 2, 3, 4];
        let whole: Vec<u8> = [&head[..], &parts.concat()].concat();
        let length = whole.len();
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; room + length];
            read.read_exact(&mut all).unwrap();
            all.split_off(room)
        });
        let mut done = 0;
        while !write_some(
            write.as_raw_fd(),
            &head,
            &slices,
            &mut done,
            Duration::from_millis(30),
        )
        .unwrap()
        {}
        assert_eq!(done, length);
        assert!(
            reader.join().unwrap() == whole,
            "the bytes read are the parts in order"
        );
    }

    #[test]
    fn a_signal_ends_the_wait_for_room_before_the_slice() {
        let (_read, write) = pipe(true);
        fill(&write);
        let done_flag = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done_flag);
        let writer = std::thread::spawn(move || {
            let mut done = 0;
            let started = Instant::now();
            let all = write_some(
                write.as_raw_fd(),
                &[0, 0, 0, 1],
                &[b"x"],
                &mut done,
                Duration::from_secs(30),
            );
            flag.store(true, Ordering::SeqCst);
            (all.unwrap(), done, started.elapsed())
        });
        let pest = pester(writer.as_pthread_t(), Arc::clone(&done_flag));
        let (all, done, took) = writer.join().unwrap();
        pest.join().unwrap();
        assert!(!all && done == 0, "interrupted, nothing written");
        assert!(
            took < Duration::from_secs(10),
            "the signal ended the wait: {took:?}"
        );
    }

    #[test]
    fn a_closed_reader_is_a_broken_pipe() {
        let (read, write) = pipe(true);
        drop(read);
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let mut done = 0;
        let err = write_some(
            write.as_raw_fd(),
            &[0, 0, 0, 1],
            &[b"x"],
            &mut done,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_small_write_waits_for_room_only_until_its_deadline() {
        let (mut read, write) = pipe(false);
        let fd = write.as_raw_fd();
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let room = fill(&write);
        unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
        assert!(
            !write_small_before(fd, b"\0\0\0\x01\xf6", Instant::now() + Duration::from_millis(20)).unwrap()
        );
        let mut drained = vec![0u8; room];
        read.read_exact(&mut drained).unwrap();
        assert!(write_small_before(fd, b"\0\0\0\x01\xf6", Instant::now() + Duration::from_secs(5)).unwrap());
        let mut got = [0u8; 5];
        read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x01\xf6");
        // the descriptor is blocking again, as the caller had it
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn readiness_and_its_timeout() {
        let (read, write) = pipe(false);
        assert_eq!(
            poll_readable(read.as_raw_fd(), Some(Duration::from_millis(1))).unwrap(),
            Some(false)
        );
        drop(write); // hung up counts as readable: the reader sees the end
        assert_eq!(poll_readable(read.as_raw_fd(), None).unwrap(), Some(true));
        assert!(wait_for_frame(read.as_raw_fd(), None).unwrap());
    }

    #[test]
    fn a_wait_unless_another_descriptor_says_which_came_first() {
        let (read, write) = pipe(false);
        let (other, other_write) = pipe(false);
        let (fd, unless) = (read.as_raw_fd(), other.as_raw_fd());
        let short = Some(Duration::from_millis(1));
        assert_eq!(poll_readable_unless(fd, unless, short).unwrap(), Some(false));
        std::io::Write::write_all(&mut &other_write, b"x").unwrap();
        // the other is readable: the wait ends at once, and says the link is not
        assert_eq!(poll_readable_unless(fd, unless, None).unwrap(), Some(false));
        std::io::Write::write_all(&mut &write, b"y").unwrap();
        assert_eq!(poll_readable_unless(fd, unless, None).unwrap(), Some(true));
    }

    #[test]
    fn room_in_a_pipe_is_counted_in_its_pages() {
        let (mut read, write) = pipe(false);
        let fd = write.as_raw_fd();
        let capacity = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) } as usize;
        assert!(pipe_has_room(fd, capacity / 2));
        assert!(!pipe_has_room(fd, capacity), "the whole pipe: no page to spare");
        std::io::Write::write_all(&mut &write, &vec![7u8; capacity / 2]).unwrap();
        assert!(!pipe_has_room(fd, capacity / 2), "half is taken");
        assert!(pipe_has_room(fd, capacity / 4));
        let mut half = vec![0u8; capacity / 2];
        read.read_exact(&mut half).unwrap();
        assert!(pipe_has_room(fd, capacity / 2));
        // not a pipe: never room
        let (socket, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!pipe_has_room(socket.as_raw_fd(), 1));
    }

    #[test]
    fn a_wait_shorter_than_a_millisecond_still_waits() {
        // (poll's timeout is in milliseconds: 200 us was no wait at all)
        let (read, _write) = pipe(false);
        let started = Instant::now();
        assert_eq!(
            poll_readable(read.as_raw_fd(), Some(Duration::from_micros(300))).unwrap(),
            Some(false)
        );
        assert!(started.elapsed() >= Duration::from_micros(300));
    }

    #[test]
    fn a_held_signal_ends_the_wait_for_a_frame_and_nothing_is_read() {
        let (read, write) = pipe(false);
        let signal = interrupting_signal();
        let done_flag = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done_flag);
        let fd = read.as_raw_fd();
        let waiter = std::thread::spawn(move || unsafe {
            // hold the signal as `signals::hold` does, let it through in the wait
            let mut held: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut held);
            libc::sigaddset(&mut held, signal);
            libc::pthread_sigmask(libc::SIG_BLOCK, &held, &mut before);
            let got = wait_for_frame(fd, Some(&before));
            flag.store(true, Ordering::SeqCst);
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            got.unwrap()
        });
        let pest = pester(waiter.as_pthread_t(), Arc::clone(&done_flag));
        assert!(!waiter.join().unwrap(), "the signal came first");
        pest.join().unwrap();
        drop(write);
    }

    #[test]
    fn the_writer_lock_is_exclusive_and_waits_only_until_its_deadline() {
        let lock = WriterLock::default();
        assert!(lock.try_acquire());
        assert!(!lock.try_acquire());
        assert!(!lock.acquire_before(Instant::now() + Duration::from_millis(10)));
        lock.release();
        assert!(lock.acquire_before(Instant::now() + Duration::from_millis(10)));
        lock.release();
        lock.acquire();
        lock.release();
    }

    #[test]
    fn a_writer_waiting_for_the_lock_gets_it_when_it_is_released() {
        // (a release wakes a waiter only when one is counted: a miscount
        // would leave these waiting for ever)
        let lock = Arc::new(WriterLock::default());
        lock.acquire();
        let waiters: Vec<_> = (0..2)
            .map(|i| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    if i == 0 {
                        lock.acquire();
                    } else {
                        assert!(lock.acquire_before(Instant::now() + Duration::from_secs(30)));
                    }
                    lock.release();
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50)); // both wait by now
        lock.release();
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert!(lock.try_acquire());
    }
}
