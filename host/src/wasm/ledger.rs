//! The calls open between the master and one guest, and the guest time they
//! have used: the per-call timeout and the protocol rules a guest cannot
//! defeat by calling its `link` import directly.
//!
//! The guest updates its `Ledger` inside the `link.send` and
//! `link.recv` imports, from the header of each frame (protocol::header):
//!
//! - `owed`: requests (and the shutdown) of the master that the guest took
//!   with `recv` and has not answered yet, with their chain and when, in
//!   guest running time, it took them;
//! - `awaited`: requests the guest sent whose reply it has not taken yet.
//!
//! Time. Guest running time is the time some master thread drives the guest
//! (guest.rs: it runs on the thread that needs a frame from it), except what
//! it spends blocked in `recv` or blocked in `send` waiting for queue room;
//! a guest nobody drives does not run, and is not charged. A call is charged
//! all running time from when the guest took it until it answers, callbacks
//! included; nothing resets that. With nothing owed, the running time since
//! the last `recv` returned is charged the same way (the start of the guest
//! counts as a call), so a guest cannot answer and then run on. Over
//! `timeout`, the guest is stopped (GuestEnd::Timeout).
//!
//! Rules (each a `Violation`, which stops the guest at once):
//!
//! - `recv` with nothing queued, while the guest owes the master an answer
//!   and the master works on none of its requests: it would wait for a frame
//!   the master will never send. The master works on an awaited request
//!   unless it has since called the guest on that request's chain (then the
//!   master waits for the guest there).
//! - A request on a chain of no request the guest owes: a guest has no
//!   threads, so every request it makes belongs to a call the master is
//!   making to it. (The master would start a thread for each new chain.)
//! - A request, reply or shutdown whose kind, id or chain is not an unsigned
//!   integer, and more than `MAX_AWAITED` requests without their replies.
//! - More bytes of the master's answers to its requests left unread than
//!   its answer budget (its `memory_limit`: it could not hold more): the
//!   master queues every answer for the guest, so a guest that asks and
//!   never reads would otherwise make the master hold them all.

use std::fmt;
use std::time::{Duration, Instant};

use crate::protocol::header::{peek_header, RAISE, REPLY, REQUEST, SHUTDOWN};

/// Requests a guest may have sent and not had answered. An honest guest has
/// one per level of recursion across interpreters (its Python recursion
/// limit keeps that far lower); this only bounds what a hostile one can make
/// the master queue for it.
pub const MAX_AWAITED: usize = 1 << 16;

const MIB: f64 = 1024.0 * 1024.0;

/// What a guest did that stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Waited for a frame while it owed the master the answer to request `id`.
    WaitedWhileOwing { id: u64 },
    /// Sent a request on a chain that is no call of the master to it.
    RequestOutsideCall { chain: u64 },
    /// Sent a message whose kind, id or chain is not an unsigned integer.
    MalformedHeader,
    /// Sent more requests without waiting for their replies than allowed.
    TooManyRequests { max: usize },
    /// Left more bytes of the master's answers unread than its budget.
    UnreadAnswers { unread: usize, budget: usize },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::WaitedWhileOwing { id } => write!(
                f,
                "waited for a message while it owed the master the answer to request {id} and the master \
                 was working on none of its requests (it would have waited forever)"
            ),
            Violation::RequestOutsideCall { chain } => write!(
                f,
                "sent a request on chain {chain:#x}, which is not a call the master is making to it \
                 (a guest makes requests only while it serves a call)"
            ),
            Violation::MalformedHeader => {
                write!(
                    f,
                    "sent a message whose kind, id or chain is not an unsigned integer"
                )
            }
            Violation::TooManyRequests { max } => {
                write!(
                    f,
                    "sent more than {max} requests without waiting for their replies"
                )
            }
            Violation::UnreadAnswers { unread, budget } => write!(
                f,
                "left {:.1} MiB of the master's answers to its requests unread, more than its \
                 memory_limit of {:.1} MiB could hold",
                *unread as f64 / MIB,
                *budget as f64 / MIB
            ),
        }
    }
}

/// One open request.
#[derive(Debug, Clone, Copy)]
struct Open {
    id: u64,
    /// None for the master's shutdown, which has no chain.
    chain: Option<u64>,
    /// Guest running time when it was taken (owed) or sent (awaited).
    at: Duration,
    /// Order of events, to tell which of two requests on a chain is newer.
    seq: u64,
}

/// The open calls of one guest and the running time they used.
#[derive(Debug)]
pub struct Ledger {
    timeout: Option<Duration>,
    /// Running time before `running_since`.
    ran: Duration,
    /// Since when the guest runs; None while it is blocked in `recv`/`send`
    /// or nobody drives it.
    running_since: Option<Instant>,
    /// Blocked in `recv` or in `send` waiting for room.
    blocked: bool,
    /// A master thread drives the guest.
    driven: bool,
    /// Running time when its last `recv` returned (zero: its start).
    last_recv: Duration,
    owed: Vec<Open>,
    awaited: Vec<Open>,
    seq: u64,
    /// Bytes of replies to its requests queued for the guest, not taken yet.
    unread_answers: usize,
    answer_budget: usize,
}

impl Ledger {
    /// A guest that starts running at `now`, driven (its start counts as a call).
    pub fn new(timeout: Option<Duration>, now: Instant) -> Ledger {
        Ledger {
            timeout,
            ran: Duration::ZERO,
            running_since: Some(now),
            blocked: false,
            driven: true,
            last_recv: Duration::ZERO,
            owed: Vec::new(),
            awaited: Vec::new(),
            seq: 0,
            unread_answers: 0,
            answer_budget: usize::MAX,
        }
    }

    /// At most `bytes` of the master's answers may wait for the guest unread.
    pub fn set_answer_budget(&mut self, bytes: usize) {
        self.answer_budget = bytes;
    }

    /// The master queues `frame` for the guest: an answer to one of its
    /// requests counts against its answer budget until the guest takes it.
    pub fn answering(&mut self, frame: &[u8]) -> Result<(), Violation> {
        if !matches!(peek_header(frame).and_then(|h| h.kind), Some(REPLY | RAISE)) {
            return Ok(()); // the master's own requests and releases are its business
        }
        self.unread_answers = self.unread_answers.saturating_add(frame.len());
        if self.unread_answers > self.answer_budget {
            return Err(Violation::UnreadAnswers {
                unread: self.unread_answers,
                budget: self.answer_budget,
            });
        }
        Ok(())
    }

    /// The master spent `time` on what the guest sent (decoding its frames,
    /// walking its releases): charged to the open call as the guest's own
    /// running time is, since the guest's clock stops while it waits for the
    /// master and what costs it a copy can cost the master far more. The
    /// next call starts anew, as for its own time. Whether the call's charge
    /// is past the timeout now.
    pub fn charge_master_time(&mut self, time: Duration, now: Instant) -> bool {
        self.ran += time;
        self.timeout.is_some_and(|timeout| self.charged(now) > timeout)
    }

    /// The guest's running time up to `now`.
    pub fn running_time(&self, now: Instant) -> Duration {
        self.ran
            + self
                .running_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// The running time the oldest open call (or, with none, the time since
    /// the last `recv` returned) has used by `now`.
    pub fn charged(&self, now: Instant) -> Duration {
        self.running_time(now).saturating_sub(self.charged_from())
    }

    fn charged_from(&self) -> Duration {
        self.owed.iter().map(|o| o.at).min().unwrap_or(self.last_recv)
    }

    /// When the charge passes the timeout if the guest keeps running: None
    /// while it is blocked (or without a timeout). In the past once it has.
    pub fn deadline(&self) -> Option<Instant> {
        let (since, timeout) = (self.running_since?, self.timeout?);
        let used = self.ran.saturating_sub(self.charged_from());
        since.checked_add(timeout.saturating_sub(used))
    }

    /// The guest blocks (in `recv`, or in `send` waiting for room): its
    /// clock stops.
    pub fn pause(&mut self, now: Instant) {
        self.blocked = true;
        self.update(now);
    }

    /// The guest no longer blocks: its clock runs while it is driven.
    pub fn resume(&mut self, now: Instant) {
        self.blocked = false;
        self.update(now);
    }

    /// Whether a master thread drives the guest (runs it on its own thread):
    /// a guest nobody drives is not running, and its clock stops.
    pub fn set_driven(&mut self, driven: bool, now: Instant) {
        self.driven = driven;
        self.update(now);
    }

    fn update(&mut self, now: Instant) {
        let runs = self.driven && !self.blocked;
        match self.running_since {
            Some(since) if !runs => {
                self.ran += now.saturating_duration_since(since);
                self.running_since = None;
            }
            None if runs => self.running_since = Some(now),
            _ => {}
        }
    }

    /// Whether the guest may block in `recv` (called when nothing is queued
    /// for it): not while it owes an answer and the master works on none of
    /// its requests.
    pub fn may_wait(&self) -> Result<(), Violation> {
        let Some(newest) = self.owed.iter().max_by_key(|o| o.seq) else {
            return Ok(()); // it owes nothing: waiting for the next call
        };
        // the master works on an awaited request unless it has called the
        // guest on that request's chain since (it then waits for the guest)
        let master_works = self.awaited.iter().any(|a| {
            !self
                .owed
                .iter()
                .any(|o| o.chain.is_some() && o.chain == a.chain && o.seq > a.seq)
        });
        if master_works {
            Ok(())
        } else {
            Err(Violation::WaitedWhileOwing { id: newest.id })
        }
    }

    /// `recv` returned `frame` (None: the link closed) at `now`.
    pub fn took(&mut self, frame: Option<&[u8]>, now: Instant) {
        self.resume(now);
        let at = self.running_time(now);
        self.last_recv = at;
        let Some(header) = frame.and_then(peek_header) else {
            return; // the end, or a handshake map
        };
        match (header.kind, header.id) {
            (Some(REQUEST), Some(id)) => self.push_owed(id, header.chain, at),
            (Some(SHUTDOWN), Some(id)) => self.push_owed(id, None, at),
            (Some(REPLY | RAISE), Some(id)) => {
                if let Some(i) = self.awaited.iter().rposition(|a| a.id == id) {
                    self.awaited.remove(i);
                }
                let len = frame.map_or(0, <[u8]>::len);
                self.unread_answers = self.unread_answers.saturating_sub(len);
            }
            _ => {} // a release (the master's frames are well-formed)
        }
    }

    fn push_owed(&mut self, id: u64, chain: Option<u64>, at: Duration) {
        self.seq += 1;
        self.owed.push(Open {
            id,
            chain,
            at,
            seq: self.seq,
        });
    }

    /// The guest sends `frame` at `now`: check it against the rules and
    /// record what it opens or answers.
    pub fn sending(&mut self, frame: &[u8], now: Instant) -> Result<(), Violation> {
        let Some(header) = peek_header(frame) else {
            return Ok(()); // a handshake map (anything else the master refuses)
        };
        match (header.kind, header.id, header.chain) {
            (Some(REQUEST), Some(id), Some(chain)) => {
                if !self.owed.iter().any(|o| o.chain == Some(chain)) {
                    return Err(Violation::RequestOutsideCall { chain });
                }
                if self.awaited.len() >= MAX_AWAITED {
                    return Err(Violation::TooManyRequests { max: MAX_AWAITED });
                }
                self.seq += 1;
                let at = self.running_time(now);
                self.awaited.push(Open {
                    id,
                    chain: Some(chain),
                    at,
                    seq: self.seq,
                });
                Ok(())
            }
            (Some(REPLY | RAISE), Some(id), _) => {
                // an answer to nothing it owes is the master's to refuse
                if let Some(i) = self.owed.iter().rposition(|o| o.id == id) {
                    self.owed.remove(i);
                }
                Ok(())
            }
            (Some(SHUTDOWN), Some(_), _) => Ok(()),
            (None, ..) | (Some(REQUEST | REPLY | RAISE | SHUTDOWN), ..) => Err(Violation::MalformedHeader),
            _ => Ok(()), // a release; unknown kinds are the master's to refuse
        }
    }

    /// How many answers the guest owes and how many replies it awaits.
    pub fn open_calls(&self) -> (usize, usize) {
        (self.owed.len(), self.awaited.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::value::Value;

    const A: u64 = (12_345 << 24) | 1;
    const B: u64 = (12_345 << 24) | 2;

    fn cbor(items: &[u64]) -> Vec<u8> {
        let value = Value::Array(items.iter().map(|&n| Value::Integer(n.into())).collect());
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).unwrap();
        out
    }

    fn request(id: u64, chain: u64) -> Vec<u8> {
        cbor(&[REQUEST, id, chain, 0])
    }

    fn reply(id: u64) -> Vec<u8> {
        cbor(&[REPLY, id, 0])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A ledger with a 1 s timeout started at `t0`, and the helpers to drive it.
    struct Guest {
        ledger: Ledger,
        t0: Instant,
    }

    impl Guest {
        fn new() -> Guest {
            let t0 = Instant::now();
            Guest {
                ledger: Ledger::new(Some(ms(1000)), t0),
                t0,
            }
        }
        fn at(&self, t: u64) -> Instant {
            self.t0 + ms(t)
        }
        /// Blocks in recv from `from` until `to`, then takes `frame`.
        fn recv(&mut self, from: u64, to: u64, frame: &[u8]) {
            self.ledger.may_wait().expect("may wait");
            self.ledger.pause(self.at(from));
            self.ledger.took(Some(frame), self.at(to));
        }
        fn send(&mut self, t: u64, frame: &[u8]) -> Result<(), Violation> {
            self.ledger.sending(frame, self.at(t))
        }
        fn charged(&self, t: u64) -> Duration {
            self.ledger.charged(self.at(t))
        }
    }

    #[test]
    fn startup_counts_as_a_call_and_waiting_for_the_master_is_free() {
        let mut g = Guest::new();
        assert_eq!(g.charged(300), ms(300));
        assert_eq!(g.ledger.deadline(), Some(g.at(1000)));
        g.ledger.pause(g.at(300)); // the guest waits for its first call
        assert_eq!(g.ledger.deadline(), None, "no deadline while blocked");
        assert_eq!(g.charged(5000), ms(300));
        g.ledger.took(Some(&request(1, A)), g.at(5000));
        assert_eq!(
            g.charged(5400),
            ms(400),
            "the call is charged from when it was taken"
        );
        assert_eq!(g.ledger.deadline(), Some(g.at(6000)));
    }

    #[test]
    fn callbacks_never_reset_the_charge_of_a_call() {
        // a guest calls the master back every 300 ms of its own time
        let mut g = Guest::new();
        g.recv(0, 100, &request(1, A));
        let mut t = 100;
        for callback in 0..5u64 {
            t += 300;
            g.send(t, &request(100 + callback, A)).unwrap();
            g.recv(t, t + 2000, &reply(100 + callback)); // the master takes 2 s: not charged
            t += 2000;
        }
        // 5 x 300 ms of running time since the call was taken, whatever the callbacks
        assert_eq!(g.charged(t), ms(1500));
        assert_eq!(
            g.ledger.deadline(),
            Some(g.at(t)),
            "due at once: stopped at the next tick"
        );
    }

    #[test]
    fn answering_ends_the_charge_of_a_call_and_running_on_is_charged() {
        let mut g = Guest::new();
        g.recv(0, 10, &request(1, A));
        g.send(610, &reply(1)).unwrap();
        assert_eq!(g.ledger.open_calls(), (0, 0));
        // nothing owed: running since the last recv returned is charged
        assert_eq!(g.charged(710), ms(700));
        g.recv(710, 9000, &request(2, A));
        assert_eq!(g.charged(9100), ms(100));
    }

    #[test]
    fn time_waiting_for_queue_room_is_not_charged() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.ledger.pause(g.at(200));
        g.ledger.resume(g.at(5200));
        assert_eq!(g.charged(5300), ms(300));
    }

    #[test]
    fn the_masters_time_on_what_it_sent_is_charged_to_the_open_call_only() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.send(100, &request(2, A)).unwrap(); // a callback, which the master decodes
        g.ledger.pause(g.at(100));
        assert!(!g.ledger.charge_master_time(ms(600), g.at(100)));
        assert_eq!(g.charged(5000), ms(700), "the master's time, not the wait");
        assert!(g.ledger.charge_master_time(ms(600), g.at(5000)));
        g.ledger.took(Some(&reply(2)), g.at(5000));
        assert_eq!(
            g.ledger.deadline(),
            Some(g.at(5000)),
            "past: it is stopped as it runs on"
        );
        g.send(5000, &reply(1)).unwrap();
        g.recv(5000, 6000, &request(3, A)); // the next call starts anew
        assert_eq!(g.charged(6100), ms(100));
        assert!(!g.ledger.charge_master_time(ms(600), g.at(6100)));
    }

    #[test]
    fn time_nobody_drives_the_guest_is_not_charged() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.ledger.set_driven(false, g.at(100)); // its caller was interrupted mid-call
        assert_eq!(g.ledger.deadline(), None, "no deadline while nobody drives it");
        g.ledger.set_driven(true, g.at(7100)); // the next caller drives it on
        assert_eq!(g.charged(7200), ms(200));
        // blocked and undriven at once: running again only when neither holds
        g.ledger.pause(g.at(7200));
        g.ledger.set_driven(false, g.at(7300));
        g.ledger.resume(g.at(7400));
        assert_eq!(g.charged(7500), ms(200));
        g.ledger.set_driven(true, g.at(8000));
        assert_eq!(g.charged(8100), ms(300));
    }

    #[test]
    fn every_owed_call_is_charged_from_when_it_was_taken() {
        // master thread A calls; the guest calls back; meanwhile master thread
        // B's call is served inline; the guest's time counts for both
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.send(100, &request(50, A)).unwrap();
        g.recv(100, 3000, &request(2, B));
        assert_eq!(g.ledger.open_calls(), (2, 1));
        g.send(3400, &reply(2)).unwrap();
        g.recv(3400, 3500, &reply(50));
        // call 1 ran 100 + 400 + 100 ms of guest time: its own, the callback's
        // wait excluded, and the inline call of thread B included
        assert_eq!(g.charged(3600), ms(600));
        g.send(3600, &reply(1)).unwrap();
        assert_eq!(g.ledger.open_calls(), (0, 0));
        assert_eq!(g.charged(3600), ms(100), "now only the time since the last recv");
    }

    #[test]
    fn waiting_while_owing_with_nothing_awaited_is_refused() {
        let mut g = Guest::new();
        assert_eq!(g.ledger.may_wait(), Ok(()), "owing nothing, it may wait");
        g.recv(0, 0, &request(7, A));
        assert_eq!(g.ledger.may_wait(), Err(Violation::WaitedWhileOwing { id: 7 }));
        g.send(10, &request(1, A)).unwrap();
        assert_eq!(g.ledger.may_wait(), Ok(()), "the master works on its request");
        g.recv(10, 20, &reply(1));
        assert_eq!(g.ledger.may_wait(), Err(Violation::WaitedWhileOwing { id: 7 }));
        g.send(30, &reply(7)).unwrap();
        assert_eq!(g.ledger.may_wait(), Ok(()));
    }

    #[test]
    fn waiting_for_a_reply_the_master_cannot_send_is_refused() {
        // master -> guest (1) -> master (callback 10) -> guest (2): the master
        // waits for the answer to 2 before it can answer 10
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.send(10, &request(10, A)).unwrap();
        g.recv(10, 20, &request(2, A));
        assert_eq!(g.ledger.may_wait(), Err(Violation::WaitedWhileOwing { id: 2 }));
        // nested the honest way: the guest calls back again and waits for that
        g.send(30, &request(11, A)).unwrap();
        assert_eq!(g.ledger.may_wait(), Ok(()));
        g.recv(30, 40, &reply(11));
        g.send(50, &reply(2)).unwrap();
        assert_eq!(g.ledger.may_wait(), Ok(()), "the master works on 10 again");
        g.recv(50, 60, &reply(10));
        g.send(70, &reply(1)).unwrap();
        assert_eq!(g.ledger.open_calls(), (0, 0));
    }

    #[test]
    fn another_master_thread_does_not_block_a_chain_the_master_works_on() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        g.send(10, &request(10, A)).unwrap();
        g.recv(10, 20, &request(2, B)); // thread B calls while A's callback runs
        g.send(30, &reply(2)).unwrap();
        assert_eq!(g.ledger.may_wait(), Ok(()), "the master still works on 10");
    }

    #[test]
    fn requests_outside_every_owed_call_are_refused() {
        let mut g = Guest::new();
        assert_eq!(
            g.send(5, &request(1, A)),
            Err(Violation::RequestOutsideCall { chain: A })
        );
        g.recv(5, 5, &request(1, A));
        assert_eq!(
            g.send(6, &request(2, B)),
            Err(Violation::RequestOutsideCall { chain: B })
        );
        assert_eq!(g.send(7, &request(3, A)), Ok(()));
        g.recv(7, 8, &reply(3));
        g.send(9, &reply(1)).unwrap();
        assert_eq!(
            g.send(10, &request(4, A)),
            Err(Violation::RequestOutsideCall { chain: A })
        );
    }

    #[test]
    fn malformed_headers_are_refused_and_other_frames_pass() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        // [0, 5, -1]: a negative chain; ["x"]; [1, 2.5]
        assert_eq!(
            g.send(1, &[0x83, 0x00, 0x05, 0x20]),
            Err(Violation::MalformedHeader)
        );
        assert_eq!(g.send(1, &[0x81, 0x61, 0x78]), Err(Violation::MalformedHeader));
        assert_eq!(
            g.send(1, &[0x82, 0x01, 0xf9, 0x41, 0x00]),
            Err(Violation::MalformedHeader)
        );
        assert_eq!(
            g.send(1, &[0xa1, 0x61, 0x78, 0xf5]),
            Ok(()),
            "a map: the handshake"
        );
        assert_eq!(g.send(1, &cbor(&[3])), Ok(()), "a release");
        assert_eq!(
            g.send(1, &cbor(&[9, 1])),
            Ok(()),
            "unknown kinds are the master's to refuse"
        );
        assert_eq!(g.ledger.open_calls(), (1, 0));
    }

    #[test]
    fn a_reply_to_nothing_owed_changes_nothing() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        assert_eq!(g.send(1, &reply(99)), Ok(()));
        assert_eq!(g.ledger.open_calls(), (1, 0));
    }

    #[test]
    fn the_shutdown_is_owed_until_answered() {
        let mut g = Guest::new();
        g.recv(0, 0, &cbor(&[SHUTDOWN, 3]));
        assert_eq!(g.ledger.may_wait(), Err(Violation::WaitedWhileOwing { id: 3 }));
        assert_eq!(
            g.send(1, &request(4, 0)),
            Err(Violation::RequestOutsideCall { chain: 0 }),
            "the shutdown is no call"
        );
        g.send(1, &cbor(&[REPLY, 3])).unwrap();
        assert_eq!(g.ledger.open_calls(), (0, 0));
    }

    #[test]
    fn requests_without_their_replies_are_bounded() {
        let mut g = Guest::new();
        g.recv(0, 0, &request(1, A));
        for id in 0..MAX_AWAITED as u64 {
            g.send(1, &request(id, A)).unwrap();
        }
        assert_eq!(
            g.send(1, &request(0, A)),
            Err(Violation::TooManyRequests { max: MAX_AWAITED })
        );
    }

    #[test]
    fn answers_left_unread_are_bounded_and_taking_them_frees_the_budget() {
        let mut g = Guest::new();
        let answer = reply(7);
        g.ledger.set_answer_budget(3 * answer.len());
        // the master's own requests never count, however many wait
        for id in 0..10 {
            g.ledger.answering(&request(id, A)).unwrap();
        }
        for _ in 0..3 {
            g.ledger.answering(&answer).unwrap();
        }
        assert_eq!(
            g.ledger.answering(&answer),
            Err(Violation::UnreadAnswers {
                unread: 4 * answer.len(),
                budget: 3 * answer.len()
            })
        );
        let mut g = Guest::new();
        g.ledger.set_answer_budget(3 * answer.len());
        for _ in 0..100 {
            g.ledger.answering(&answer).unwrap();
            g.recv(0, 0, &answer); // taken as it comes: never over
        }
    }

    #[test]
    fn no_timeout_means_no_deadline_and_a_huge_one_does_not_overflow() {
        let now = Instant::now();
        assert_eq!(Ledger::new(None, now).deadline(), None);
        let huge = Ledger::new(Some(Duration::from_secs(u64::MAX / 4)), now);
        let _ = huge.deadline(); // None or far away, never a panic
    }
}
