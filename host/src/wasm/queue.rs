//! Frame queues between the master and a guest.
//!
//! Nothing here blocks a thread: the guest runs on the thread that drives it
//! (guest.rs), so a side that finds nothing to take, or no room, leaves a
//! `Waker` and is woken when the other side acts.
//!
//! A queue holds whole frames and a byte budget: a frame that does not fit
//! is refused (`Full`) while the queue holds others, so a guest that floods
//! the master with frames cannot grow the master's memory without bound; it
//! waits for room. Closing wakes whoever waits.
//!
//! A queue can also keep an eventfd as a readiness level for the master's
//! Python threads, which wait in `select` (interruptible by signals, and
//! safe for daemon threads at interpreter shutdown). The level is not raised
//! for every frame: the thread that drives the guest takes the frames it
//! made itself, so the level is set only by `publish` (frames left for
//! others after a reader took its own) and by `close`, and cleared when the
//! queue runs empty. A frame then costs no system call and wakes no poller.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The queue was closed: the other side is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over the byte budget: the frame comes back, to be offered again.
    Full(Vec<u8>),
    Closed,
}

/// What a pop found.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    Frame(Vec<u8>),
    Closed,
    /// Nothing queued (yet); for a timed wait, the time ran out.
    TimedOut,
}

/// What a pop does to the readiness level (see `FrameQueue::pop`).
#[derive(Clone, Copy)]
enum Level {
    Keep,
    ClearWhenEmpty,
    Publish,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
    /// Whether the readiness level is set.
    level: bool,
    /// The consumer waiting for a frame.
    taker: Option<Waker>,
    /// The producer waiting for room.
    giver: Option<Waker>,
}

pub struct FrameQueue {
    state: Mutex<State>,
    max_bytes: usize,
    readable: Option<EventFd>,
}

/// An eventfd used as a level: readable while set.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain system call; the result is checked before use
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64; EAGAIN (counter full) still leaves it readable
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN means it was clear already
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl FrameQueue {
    /// A queue that refuses a frame while it would hold more than
    /// `max_bytes` (one frame is always accepted into an empty queue,
    /// whatever its size).
    pub fn new(max_bytes: usize) -> Self {
        FrameQueue {
            state: Mutex::default(),
            max_bytes,
            readable: None,
        }
    }

    /// Like `new`, with a readiness descriptor (see `readable_fd`).
    pub fn with_readable_fd(max_bytes: usize) -> io::Result<Self> {
        let mut queue = Self::new(max_bytes);
        queue.readable = Some(EventFd::new()?);
        Ok(queue)
    }

    /// The readiness descriptor, if the queue has one: readable while the
    /// queue is closed, or holds frames that were published.
    pub fn readable_fd(&self) -> Option<RawFd> {
        self.readable.as_ref().map(|e| e.0.as_raw_fd())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Caller holds the lock: sets the readiness level to `on`.
    fn level(&self, state: &mut State, on: bool) {
        if let Some(readable) = &self.readable {
            if state.level != on {
                state.level = on;
                if on {
                    readable.set();
                } else {
                    readable.clear();
                }
            }
        }
    }

    /// Queues `frame` unless it does not fit (or the queue is closed); wakes
    /// the consumer that waits for a frame.
    pub fn try_push(&self, frame: Vec<u8>) -> Result<(), Refused> {
        let taker = {
            let mut state = self.lock();
            if state.closed {
                return Err(Refused::Closed);
            }
            if !state.frames.is_empty() && state.bytes + frame.len() > self.max_bytes {
                return Err(Refused::Full(frame));
            }
            state.bytes += frame.len();
            state.frames.push_back(frame);
            state.taker.take()
        };
        if let Some(taker) = taker {
            taker.wake();
        }
        Ok(())
    }

    /// Queues `frame` whatever the budget (for a queue without one).
    pub fn push(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let taker = {
            let mut state = self.lock();
            if state.closed {
                return Err(Closed);
            }
            state.bytes += frame.len();
            state.frames.push_back(frame);
            state.taker.take()
        };
        if let Some(taker) = taker {
            taker.wake();
        }
        Ok(())
    }

    /// Offers the frame in `slot` until it fits: Ready once queued (the slot
    /// is then empty) or the queue closed; Pending with `cx`'s waker left
    /// for the consumer's next pop.
    pub fn poll_push(&self, slot: &mut Option<Vec<u8>>, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        let taker = {
            let mut state = self.lock();
            if state.closed {
                return Poll::Ready(Err(Closed));
            }
            let Some(frame) = slot.take() else {
                return Poll::Ready(Ok(()));
            };
            if !state.frames.is_empty() && state.bytes + frame.len() > self.max_bytes {
                *slot = Some(frame);
                state.giver = Some(cx.waker().clone());
                return Poll::Pending;
            }
            state.bytes += frame.len();
            state.frames.push_back(frame);
            state.taker.take()
        };
        if let Some(taker) = taker {
            taker.wake();
        }
        Poll::Ready(Ok(()))
    }

    /// The next frame, `Closed` once closed and drained, else `TimedOut`.
    pub fn try_pop(&self) -> Popped {
        self.pop(Level::Keep)
    }

    /// Like `try_pop`, for a reader that takes every frame queued before it
    /// leaves, or says so with `publish` (the kernel's: a reader routes all
    /// it finds): the readiness level is cleared once nothing is left, never
    /// set, so frames it is about to take wake no other thread.
    pub fn pop_for_reader(&self) -> Popped {
        self.pop(Level::ClearWhenEmpty)
    }

    /// Like `try_pop`, then sets the readiness level to whether anything is
    /// left to take (frames, or the end): what a reader does as it leaves
    /// frames it did not take to the others.
    pub fn pop_and_publish(&self) -> Popped {
        self.pop(Level::Publish)
    }

    fn pop(&self, rule: Level) -> Popped {
        let (popped, giver) = {
            let mut state = self.lock();
            let popped = self.take(&mut state);
            let left = !state.frames.is_empty() || state.closed;
            match rule {
                Level::Keep => {}
                Level::ClearWhenEmpty if !left => self.level(&mut state, false),
                Level::ClearWhenEmpty => {}
                Level::Publish => self.level(&mut state, left),
            }
            (popped, state.giver.take())
        };
        if let Some(giver) = giver {
            giver.wake(); // it tries again; if there is still no room it waits again
        }
        popped
    }

    /// Sets the readiness level if frames are queued (or the queue closed).
    pub fn publish(&self) {
        let mut state = self.lock();
        let left = !state.frames.is_empty() || state.closed;
        self.level(&mut state, left);
    }

    /// The next frame (Some), or the end (None), or Pending with `cx`'s
    /// waker left for the next push or close.
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        let mut state = self.lock();
        match self.take(&mut state) {
            Popped::Frame(frame) => Poll::Ready(Some(frame)),
            Popped::Closed => Poll::Ready(None),
            Popped::TimedOut => {
                state.taker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Caller holds the lock: the next frame, `Closed`, or `TimedOut` if empty.
    fn take(&self, state: &mut State) -> Popped {
        if let Some(frame) = state.frames.pop_front() {
            state.bytes -= frame.len();
            if state.frames.is_empty() && !state.closed {
                self.level(state, false);
            }
            return Popped::Frame(frame);
        }
        if state.closed {
            Popped::Closed
        } else {
            Popped::TimedOut
        }
    }

    /// Whether a frame is queued.
    pub fn has_frames(&self) -> bool {
        !self.lock().frames.is_empty()
    }

    /// No more frames go in; what is queued can still be taken.
    pub fn close(&self) {
        let wakers = {
            let mut state = self.lock();
            state.closed = true;
            self.level(&mut state, true);
            (state.taker.take(), state.giver.take())
        };
        wake_both(wakers);
    }

    /// Closes the queue and drops what it holds.
    pub fn close_and_clear(&self) {
        let wakers = {
            let mut state = self.lock();
            state.closed = true;
            state.frames.clear();
            state.bytes = 0;
            self.level(&mut state, true);
            (state.taker.take(), state.giver.take())
        };
        wake_both(wakers);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

fn wake_both((taker, giver): (Option<Waker>, Option<Waker>)) {
    for waker in [taker, giver].into_iter().flatten() {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (Arc::clone(&count), Waker::from(count))
    }

    #[test]
    fn frames_come_out_in_order_then_the_end_after_close() {
        let q = FrameQueue::new(1024);
        q.push(b"a".to_vec()).unwrap();
        q.push(b"bc".to_vec()).unwrap();
        q.close();
        assert_eq!(q.try_pop(), Popped::Frame(b"a".to_vec()));
        assert_eq!(q.try_pop(), Popped::Frame(b"bc".to_vec()));
        assert_eq!(q.try_pop(), Popped::Closed);
        assert_eq!(q.push(b"late".to_vec()), Err(Closed));
    }

    #[test]
    fn producer_waits_while_over_budget() {
        let q = FrameQueue::new(10);
        let (woken, w) = waker();
        let mut cx = Context::from_waker(&w);
        let mut first = Some(vec![0; 8]);
        assert_eq!(q.poll_push(&mut first, &mut cx), Poll::Ready(Ok(())));
        // the second frame does not fit until the first is taken
        let mut second = Some(vec![1; 8]);
        assert_eq!(q.poll_push(&mut second, &mut cx), Poll::Pending);
        assert!(second.is_some(), "the frame is kept to be offered again");
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
        assert_eq!(q.try_pop(), Popped::Frame(vec![0; 8]));
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "taking a frame wakes the producer"
        );
        assert_eq!(q.poll_push(&mut second, &mut cx), Poll::Ready(Ok(())));
        assert_eq!(q.try_pop(), Popped::Frame(vec![1; 8]));
    }

    #[test]
    fn an_oversized_frame_still_fits_an_empty_queue() {
        let q = FrameQueue::new(4);
        assert_eq!(q.try_push(vec![0; 100]), Ok(()));
        assert_eq!(q.try_push(vec![0; 1]), Err(Refused::Full(vec![0; 1])));
    }

    #[test]
    fn a_waiting_consumer_is_woken_by_a_push_or_the_close() {
        let q = FrameQueue::new(1024);
        let (woken, w) = waker();
        let mut cx = Context::from_waker(&w);
        assert_eq!(q.poll_pop(&mut cx), Poll::Pending);
        q.push(b"x".to_vec()).unwrap();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_pop(&mut cx), Poll::Ready(Some(b"x".to_vec())));
        assert_eq!(q.poll_pop(&mut cx), Poll::Pending);
        q.close_and_clear();
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        assert_eq!(q.poll_pop(&mut cx), Poll::Ready(None));
    }

    fn fd_is_readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn the_readable_fd_shows_published_frames_and_the_end() {
        let q = FrameQueue::with_readable_fd(1024).unwrap();
        let fd = q.readable_fd().unwrap();
        assert!(!fd_is_readable(fd));
        assert_eq!(q.try_pop(), Popped::TimedOut);
        q.push(b"a".to_vec()).unwrap();
        q.push(b"b".to_vec()).unwrap();
        q.push(b"c".to_vec()).unwrap();
        assert!(!fd_is_readable(fd), "frames a driver made are its own to take");
        assert_eq!(q.pop_and_publish(), Popped::Frame(b"a".to_vec()));
        assert!(fd_is_readable(fd), "two frames are left for the others");
        assert!(q.has_frames());
        assert_eq!(q.try_pop(), Popped::Frame(b"b".to_vec()));
        assert!(fd_is_readable(fd), "one frame is still queued");
        assert_eq!(q.try_pop(), Popped::Frame(b"c".to_vec()));
        assert!(!fd_is_readable(fd));
        assert!(!q.has_frames());
        q.push(b"e".to_vec()).unwrap();
        q.push(b"f".to_vec()).unwrap();
        assert_eq!(q.pop_for_reader(), Popped::Frame(b"e".to_vec()));
        assert!(
            !fd_is_readable(fd),
            "a reader that takes all it finds raises no level"
        );
        q.publish();
        assert!(fd_is_readable(fd), "it left one: published");
        assert_eq!(q.pop_for_reader(), Popped::Frame(b"f".to_vec()));
        assert!(!fd_is_readable(fd));
        q.push(b"d".to_vec()).unwrap();
        q.publish();
        assert!(fd_is_readable(fd));
        assert_eq!(q.pop_and_publish(), Popped::Frame(b"d".to_vec()));
        assert!(!fd_is_readable(fd));
        q.close();
        assert!(fd_is_readable(fd), "the end is readable");
        assert_eq!(q.try_pop(), Popped::Closed);
        assert!(fd_is_readable(fd));
    }
}
