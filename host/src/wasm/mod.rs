//! WASI guests: CPython compiled to a WebAssembly component (wasm/), run by
//! wasmtime inside the master process, one store per guest, each run on a
//! fiber by the master thread that needs a frame from it (guest.rs).
//! The sandbox policy on this side: what the guest may see (`view`, the WASI
//! context in `guest`), how much it may take (`guest`, `runtime`, `output`,
//! `queue`), what it may do on its link (`ledger`), and how it is stopped.

pub mod clocks;
pub mod config;
pub mod driver;
pub mod end;
pub mod fault_around;
pub mod frames_out;
pub mod guest;
pub mod imports;
pub mod ledger;
pub mod output;
pub mod queue;
pub mod relay;
pub mod runtime;
pub mod snapshot;
pub mod trap_handlers;
pub mod view;

pub use config::GuestConfig;
pub use end::{EndKind, GuestEnd};
pub use guest::WasiGuest;
