//! The guest's side of its link: the `link` interface it imports (the WIT
//! world in wasm/wit/world.wit), and its store data with the limiter.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::config::{LINK_INTERFACE, MAX_TABLE_ELEMENTS};
use super::driver::{lock, Shared};
use super::end::GuestEnd;
use super::queue::{Closed, Popped};
use crate::protocol::rendition;

impl Shared {
    /// A frame the guest wrote to its stdout (frames_out.rs, which checked
    /// its size against the cap from its header).
    pub(super) async fn guest_sends(&self, frame: Vec<u8>) -> wasmtime::Result<()> {
        if frame.is_empty() {
            return Ok(()); // a keep-alive: nothing for the master
        }
        let checked = self.ledger().sending(&frame, Instant::now());
        checked.map_err(|v| self.broke(v))?;
        let mut slot = Some(frame);
        let mut blocked = false;
        let pushed = poll_fn(|cx| {
            let pushed = self.from_guest.poll_push(&mut slot, cx);
            if pushed.is_pending() && !blocked {
                // time spent waiting for the master to read is not the guest's
                blocked = true;
                self.block();
            }
            pushed
        })
        .await;
        if blocked {
            self.unblock();
        }
        if pushed.is_ok() && lock(&self.drive).publish {
            self.from_guest.publish();
        }
        pushed.map_err(|Closed| wasmtime::Error::msg("the master closed the link"))
    }

    /// The `link.recv` import.
    pub(super) async fn guest_receives(&self) -> wasmtime::Result<Option<Vec<u8>>> {
        self.output.flush();
        if self.from_guest.has_frames() && self.to_guest.has_frames() {
            // The guest is done with what it sent (its kernel flushes its
            // releases before it asks): let the thread that drives it take
            // those frames now, rather than serve the next request first.
            // (With nothing queued it waits below, its clock stopped, and
            // nobody needs to run it on to get there.)
            let mut asked = false;
            poll_fn(|_| {
                if asked {
                    return Poll::Ready(());
                }
                asked = true;
                let mut drive = lock(&self.drive);
                drive.boundary = true;
                drive.woken = true; // it goes on when driven again
                Poll::Pending
            })
            .await;
        }
        let frame = match self.to_guest.try_pop() {
            Popped::Frame(frame) => Some(frame),
            Popped::Closed => None,
            Popped::TimedOut => {
                // nothing queued: the guest would wait for the master
                let allowed = self.ledger().may_wait();
                allowed.map_err(|v| self.broke(v))?;
                self.block();
                poll_fn(|cx| self.to_guest.poll_pop(cx)).await
            }
        };
        let mut ledger = self.ledger();
        ledger.took(frame.as_deref(), Instant::now());
        self.update_deadline(&ledger);
        drop(ledger);
        // what the guest reads faster, if its hello said it can (the ledger
        // above read the frame as the master sent it)
        if self.renditions.load(Ordering::Relaxed) {
            if let Some(rendered) = frame.as_deref().and_then(rendition::render) {
                return Ok(Some(rendered));
            }
        }
        Ok(frame)
    }
}

/// The store data of a guest.
pub struct GuestState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) shared: Arc<Shared>,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

pub(super) struct Limiter {
    pub(super) memory_limit: usize,
    pub(super) shared: Arc<Shared>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            tracing::debug!(
                current,
                desired,
                limit = self.memory_limit,
                "guest memory limit reached"
            );
            self.shared.stop(GuestEnd::Memory {
                limit: self.memory_limit,
                wanted: desired,
            });
            return Err(wasmtime::Error::msg("the guest reached its memory limit"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Defines the `link` interface the guest imports.
pub fn add_link_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    let mut link = linker.instance(LINK_INTERFACE)?;
    link.func_wrap("twin-id", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.twin_id.clone(),))
    })?;
    link.func_wrap("paths", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.paths.clone(),))
    })?;
    link.func_wrap("max-frame", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        Ok((cx.data().shared.max_frame as u64,))
    })?;
    link.func_wrap_async("recv", |cx: StoreContextMut<'_, GuestState>, (): ()| {
        let shared = Arc::clone(&cx.data().shared);
        Box::new(async move { Ok((shared.guest_receives().await?,)) })
    })?;
    Ok(())
}
