//! The one error type of the host crate.

use std::io;

/// Everything that can go wrong in the host, each with a message that says
/// what happened and, where the user can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The twin's executable could not be found or started.
    #[error("{0}")]
    Spawn(String),
    /// The peer violated the protocol (bad frame, bad handshake, ...).
    #[error("{0}")]
    Protocol(String),
    /// The peer speaks another version of the protocol.
    #[error(
        "the twin speaks cpy2py protocol {theirs}, this master speaks protocol {ours}: \
         run the same cpy2py version in both (the master injects its own package into native twins, \
         so check for a different cpy2py installed in the twin's environment)"
    )]
    VersionMismatch { theirs: u64, ours: u64 },
    /// The twin process ended; carries a description of how.
    #[error("{0}")]
    Terminated(String),
    /// A sandboxed guest ran past its call timeout.
    #[error("{0}")]
    Timeout(String),
    /// A sandboxed guest reached its memory limit.
    #[error("{0}")]
    OutOfMemory(String),
    /// A value cannot be encoded or decoded.
    #[error("{0}")]
    Codec(String),
    /// The caller passed an argument the host cannot use.
    #[error("{0}")]
    Usage(String),
    /// A plain I/O error on the protocol stream.
    #[error("I/O error on the twin protocol stream: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;
