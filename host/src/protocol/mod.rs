//! The twin protocol without Python: frames, the handshake, message headers
//! and the value model. Documented in docs/protocol.md.

pub mod budget;
pub mod frame;
pub mod handshake;
pub mod header;
pub mod message;
pub mod plain;
pub mod rendition;
pub mod surrogates;
pub mod tags;
pub mod value;

pub use handshake::PROTOCOL_VERSION;
