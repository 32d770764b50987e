//! How a guest ended, in words and as the class of exception the master raises.

use std::time::Duration;

use super::ledger::Violation;

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// `run` returned (0) or the guest called `exit`.
    Exited(i32),
    /// A call ran longer than the timeout.
    Timeout(Duration),
    /// The guest broke a rule of the link (ledger.rs).
    Broke(Violation),
    /// The guest tried to grow its memory beyond the limit.
    Memory { limit: usize, wanted: usize },
    /// The guest sent a frame larger than the cap.
    FrameTooBig { size: usize, cap: usize },
    /// The master stopped it.
    Killed,
    /// A wasm trap or another failure of the guest.
    Trap(String),
}

/// The class of Python exception a guest's end is reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    Normal,
    Timeout,
    Memory,
    Terminated,
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl GuestEnd {
    /// How it ended, in words (follows "twinterpreter 'x' ").
    pub fn describe(&self) -> String {
        match self {
            GuestEnd::Exited(0) => "exited".into(),
            GuestEnd::Exited(code) => format!("exited with status {code}"),
            // (the shortest form of the seconds given: 1, 0.25, 0.0001, as a native twin's)
            GuestEnd::Timeout(limit) => format!(
                "ran longer than its timeout of {} s for one call and was stopped",
                limit.as_secs_f64()
            ),
            GuestEnd::Memory { limit, wanted } => format!(
                "needed {} of memory, more than its memory_limit of {}, and was stopped",
                mib(*wanted),
                mib(*limit)
            ),
            GuestEnd::FrameTooBig { size, cap } => {
                format!("sent a message of {size} bytes, more than the cap of {cap} bytes, and was stopped")
            }
            GuestEnd::Broke(violation) => format!("{violation}, and was stopped"),
            GuestEnd::Killed => "was killed by the master".into(),
            GuestEnd::Trap(what) => format!("crashed ({what})"),
        }
    }

    pub fn kind(&self) -> EndKind {
        match self {
            GuestEnd::Exited(0) | GuestEnd::Killed => EndKind::Normal,
            GuestEnd::Timeout(_) => EndKind::Timeout,
            GuestEnd::Memory { .. } => EndKind::Memory,
            _ => EndKind::Terminated,
        }
    }

    /// What the user can do about it.
    pub fn advice(&self) -> &'static str {
        match self {
            GuestEnd::Timeout(_) => {
                " (pass a larger timeout= to TwinMaster or SandboxPool if the call needs longer)"
            }
            GuestEnd::Memory { .. } => {
                " (pass a larger memory_limit= to TwinMaster or SandboxPool if the guest needs more)"
            }
            GuestEnd::FrameTooBig { .. } => " (send smaller values, or a proxy of the object)",
            GuestEnd::Broke(Violation::UnreadAnswers { .. }) => {
                " (its code asked the master for more than it read: read answers as they come, or pass \
                 a larger memory_limit= if the guest needs them all at once)"
            }
            GuestEnd::Broke(_) => " (its code used the link import outside the cpy2py protocol)",
            _ => "",
        }
    }
}
