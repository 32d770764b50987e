//! The relay of a sandboxed twin placed on a Ray node (cpy2py/ray_sandbox.py):
//! in the guest's host process there, one thread moves frames between the
//! master's TCP link and the guest, with no Python between them.
//!
//! It reads the master's frames and hands each to the guest, which runs on
//! it at once (as a local master's caller runs a local guest), then sends
//! the master what the guest sent. Another thread of the process keeps
//! driving the guest meanwhile (through its sleeps, `WasiGuest::wait`); what
//! that one makes the guest send is published on the guest's readiness
//! descriptor, which the relay watches beside the link.
//!
//! Frames to the master are written at once when the socket takes them
//! whole, else queued for a writer thread, so that the relay goes on
//! reading the master while the master does not read. Past `MAX_UNSENT`
//! queued bytes it waits for the writer, reading neither side: the guest's
//! frames stay in the guest's queue, where the guest waits for room as it
//! would locally, and the master's in the socket, which pushes back.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::driver::DRIVE_SLICE;
use super::guest::WasiGuest;
use super::queue::Popped;
use crate::pipe::poll_all;
use crate::protocol::frame::{self, FrameReader, ReadOutcome};

/// Bytes of frames for the master queued while the master does not read,
/// past which the relay waits for the writer.
pub const MAX_UNSENT: usize = 64 << 20;

/// How long the relay, once the guest ended, waits for what is queued for
/// the master to go out.
const FLUSH_AT_END: Duration = Duration::from_secs(2);

/// Why the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The guest ended, and what it sent was passed on (or the time for
    /// that ran out).
    GuestEnded,
    /// The master's link ended, failed or carried something that is not a
    /// frame: the guest was stopped.
    MasterGone,
}

/// Relays between the master's link `link` (a connected socket in
/// blocking mode, owned by the caller, who shuts it down afterwards: that
/// ends a writer still blocked on it) and `guest` until either ends. Fails
/// only if the writer thread cannot start.
pub fn relay(guest: &WasiGuest, link: RawFd) -> io::Result<RelayEnd> {
    relay_holding(guest, link, MAX_UNSENT)
}

/// `relay`, waiting for the writer past `max_unsent` queued bytes instead
/// of `MAX_UNSENT` (a test's smaller limit).
pub fn relay_holding(guest: &WasiGuest, link: RawFd, max_unsent: usize) -> io::Result<RelayEnd> {
    let outbox = Outbox::start(link, max_unsent)?;
    let mut reader = FrameReader::default();
    let end = loop {
        if !outbox.wait_for_room() {
            break master_gone(guest); // (the link failed)
        }
        let from_master = reader.has_input()
            || match poll_all([link, guest.readable_fd()], libc::POLLIN, None) {
                Ok(Some([link_events, _])) => link_events != 0,
                Ok(None) => false, // (a signal: look again)
                Err(_) => break master_gone(guest),
            };
        if from_master {
            match reader.read(&mut Descriptor(link), frame::DEFAULT_MAX_FRAME) {
                Ok(ReadOutcome::Frame(frame)) => hand_to_guest(guest, frame),
                Ok(ReadOutcome::Interrupted) => {}
                // the master is gone, or what came was not the master's
                Ok(ReadOutcome::Eof | ReadOutcome::Truncated | ReadOutcome::Large { .. }) | Err(_) => {
                    break master_gone(guest)
                }
            }
        }
        match pass_on(guest, &outbox) {
            Some(end) => break end,
            None => continue,
        }
    };
    if end == RelayEnd::GuestEnded {
        outbox.flush(Instant::now() + FLUSH_AT_END);
    }
    outbox.stop();
    Ok(end)
}

fn master_gone(guest: &WasiGuest) -> RelayEnd {
    guest.kill();
    RelayEnd::MasterGone
}

/// Hands `frame` to the guest and runs the guest until it has dealt with
/// it, if that is this thread's to do (`WasiGuest::hand`). A guest that
/// ended takes nothing; what it sent before is still passed on.
fn hand_to_guest(guest: &WasiGuest, frame: Vec<u8>) {
    if let Ok(Some(_claim)) = guest.hand(frame) {
        while !guest.run_queued(Instant::now() + DRIVE_SLICE) {}
    }
}

/// Sends the master the frames the guest sent, while the queue has room;
/// the relay's end once the guest ended and all it sent was taken.
fn pass_on(guest: &WasiGuest, outbox: &Outbox) -> Option<RelayEnd> {
    while outbox.queued() <= outbox.max_unsent {
        match guest.try_recv() {
            Popped::Frame(frame) => {
                if outbox.send(frame).is_err() {
                    return Some(master_gone(guest));
                }
            }
            Popped::Closed => return Some(RelayEnd::GuestEnded),
            Popped::TimedOut => return None,
        }
    }
    None
}

/// The link's descriptor, owned by the caller (not closed here), for
/// `FrameReader` and `write_all`; writes never raise SIGPIPE.
struct Descriptor(RawFd);

impl Read for Descriptor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a buffer of that length
        let got = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(got as usize)
    }
}

impl Write for Descriptor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from a buffer of that length
        let sent = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Frames for the master, in order: sent at once while nothing waits,
/// else queued for the writer thread.
struct Outbox {
    link: RawFd,
    /// queued bytes past which the relay waits for the writer
    max_unsent: usize,
    shared: Arc<(Mutex<Unsent>, Condvar)>,
}

#[derive(Default)]
struct Unsent {
    /// bytes to write, oldest first (a frame's header and payload, or what
    /// is left of them)
    queue: VecDeque<Vec<u8>>,
    /// the writer writes one taken off the queue
    writing: bool,
    /// bytes in the queue and being written
    bytes: usize,
    /// the link failed (the master is gone), or the relay is done
    done: bool,
}

impl Outbox {
    fn start(link: RawFd, max_unsent: usize) -> io::Result<Outbox> {
        let shared = Arc::new((Mutex::new(Unsent::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        thread::Builder::new()
            .name("cpy2py-to-master".into())
            .spawn(move || write_queued(link, &theirs))?;
        Ok(Outbox {
            link,
            max_unsent,
            shared,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Unsent> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queued(&self) -> usize {
        self.lock().bytes
    }

    /// Sends one frame with `payload`; fails once the link has.
    fn send(&self, payload: Vec<u8>) -> io::Result<()> {
        let head = frame::header(payload.len()).map_err(|e| io::Error::other(e.to_string()))?;
        let mut unsent = self.lock();
        if unsent.done {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut data = if unsent.queue.is_empty() && !unsent.writing {
            let sent = send_now(self.link, &head, &payload)?;
            if sent == head.len() + payload.len() {
                return Ok(());
            }
            let mut rest = Vec::with_capacity(head.len() + payload.len() - sent);
            if sent < head.len() {
                rest.extend_from_slice(&head[sent..]);
                rest.extend_from_slice(&payload);
            } else {
                rest.extend_from_slice(&payload[sent - head.len()..]);
            }
            rest
        } else {
            let mut data = Vec::with_capacity(head.len() + payload.len());
            data.extend_from_slice(&head);
            data.extend_from_slice(&payload);
            data
        };
        data.shrink_to_fit();
        unsent.bytes += data.len();
        unsent.queue.push_back(data);
        self.shared.1.notify_all();
        Ok(())
    }

    /// Waits while more than `max_unsent` bytes are queued; false once the
    /// link failed.
    fn wait_for_room(&self) -> bool {
        let mut unsent = self.lock();
        while unsent.bytes > self.max_unsent && !unsent.done {
            unsent = self.shared.1.wait(unsent).unwrap_or_else(|e| e.into_inner());
        }
        !unsent.done
    }

    /// Waits until all that was queued is written, the link failed, or
    /// `deadline`.
    fn flush(&self, deadline: Instant) {
        let mut unsent = self.lock();
        while unsent.bytes > 0 && !unsent.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            unsent = self
                .shared
                .1
                .wait_timeout(unsent, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends the writer (one blocked in a write ends when the caller shuts
    /// the link down).
    fn stop(&self) {
        self.lock().done = true;
        self.shared.1.notify_all();
    }
}

/// The writer thread: writes what is queued, in order, until told to stop
/// or the link fails.
fn write_queued(link: RawFd, shared: &(Mutex<Unsent>, Condvar)) {
    let lock = || shared.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let data = {
            let mut unsent = lock();
            loop {
                if unsent.done {
                    return;
                }
                if let Some(data) = unsent.queue.pop_front() {
                    unsent.writing = true;
                    break data;
                }
                unsent = shared.1.wait(unsent).unwrap_or_else(|e| e.into_inner());
            }
        };
        let written = Descriptor(link).write_all(&data);
        let mut unsent = lock();
        unsent.writing = false;
        unsent.bytes -= data.len();
        if written.is_err() {
            unsent.done = true;
        }
        shared.1.notify_all();
    }
}

/// Sends what of `head` and `payload` the socket takes without waiting; how
/// many bytes.
fn send_now(link: RawFd, head: &[u8], payload: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: a message of two iovecs over buffers that live for the call
    let sent = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = iov.as_ptr() as *mut libc::iovec;
        message.msg_iovlen = iov.len() as _;
        libc::sendmsg(link, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(err),
        };
    }
    Ok(sent as usize)
}
