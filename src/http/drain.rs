//! Graceful shutdown of the open connections: `Drain::watch` wraps a connection, and
//! `Drain::shutdown` asks every watched connection to finish its in-flight requests and close,
//! then waits until all have.
//!
//! It replaces hyper-util's `GracefulShutdown`, whose watch channel re-polled a `Notified`
//! future (a mutex round trip) every time a connection was polled: about 330 instructions per
//! keep-alive request (loadtest/README.md). Here a connection registers its task's waker once,
//! and each poll after that is one atomic load and a waker comparison.

use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// A connection that can be asked to finish its in-flight requests and close: hyper's
/// connections (through hyper-util's sealed `GracefulConnection`), and fakes in tests.
pub trait Connection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<T: hyper_util::server::graceful::GracefulConnection> Connection for T {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::graceful::GracefulConnection::graceful_shutdown(self)
    }
}

/// The shutdown side (clones share it); `watch` hands out the connection side.
#[derive(Clone, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    closing: AtomicBool,
    /// Watched connections not yet dropped (polled or not).
    open: AtomicUsize,
    /// The waker of each polled connection, by slot; `free` lists the empty slots.
    wakers: Mutex<Slots>,
    all_closed: tokio::sync::Notify,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Drain {
    /// Wraps a connection so that `shutdown` reaches it.
    pub fn watch<C: Connection>(&self, conn: C) -> Watched<C> {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        Watched {
            conn: Box::pin(conn),
            shared: self.shared.clone(),
            slot: None,
            shutting: false,
        }
    }

    /// Connections watched and not yet finished.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Asks every watched connection, present and future, to shut down gracefully, and
    /// resolves when none is left.
    pub async fn shutdown(&self) {
        // Stored before the wakers are taken: a connection registering after this lock sees
        // it, and one registered before is woken below.
        self.shared.closing.store(true, Ordering::SeqCst);
        for w in self.shared.wakers.lock().wakers.iter().flatten() {
            w.wake_by_ref();
        }
        loop {
            let notified = self.shared.all_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A watched connection: polls the connection, and starts its graceful shutdown once the
/// drain begins.
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    shared: Arc<Shared>,
    /// The slot holding this task's waker, once polled.
    slot: Option<(usize, Waker)>,
    shutting: bool,
}

impl<C: Connection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.shutting {
            match &this.slot {
                Some((_, w)) if w.will_wake(cx.waker()) => {}
                _ => this.register(cx.waker()),
            }
            if this.shared.closing.load(Ordering::SeqCst) {
                this.shutting = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Watched<C> {
    /// Puts the task's waker in this connection's slot (taking a slot the first time).
    fn register(&mut self, waker: &Waker) {
        let mut slots = self.shared.wakers.lock();
        let slot = match &self.slot {
            Some((slot, _)) => *slot,
            None => match slots.free.pop() {
                Some(slot) => slot,
                None => {
                    slots.wakers.push(None);
                    slots.wakers.len() - 1
                }
            },
        };
        slots.wakers[slot] = Some(waker.clone());
        self.slot = Some((slot, waker.clone()));
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.slot.take() {
            let mut slots = self.shared.wakers.lock();
            slots.wakers[slot] = None;
            slots.free.push(slot);
        }
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection that answers for `busy` after its graceful shutdown starts, then ends;
    /// without a shutdown it never ends.
    struct FakeConn {
        shutdown_at: Option<tokio::time::Instant>,
        busy: Duration,
        sleep: Pin<Box<tokio::time::Sleep>>,
        polls: Arc<AtomicUsize>,
    }

    impl FakeConn {
        fn new(busy: Duration, polls: Arc<AtomicUsize>) -> FakeConn {
            FakeConn {
                shutdown_at: None,
                busy,
                sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
                polls,
            }
        }
    }

    impl Future for FakeConn {
        type Output = Result<(), std::io::Error>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) if self.shutdown_at.is_some() => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            }
        }
    }

    impl Connection for FakeConn {
        fn graceful_shutdown(mut self: Pin<&mut Self>) {
            assert!(self.shutdown_at.is_none(), "asked to shut down twice");
            let at = tokio::time::Instant::now() + self.busy;
            self.shutdown_at = Some(at);
            self.sleep.as_mut().reset(at);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_reaches_idle_connections_and_waits_for_the_busy_ones() {
        let drain = Drain::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for busy_ms in [0, 50, 200] {
            let conn = drain.watch(FakeConn::new(Duration::from_millis(busy_ms), polls.clone()));
            tasks.push(tokio::spawn(conn));
        }
        // Let every connection park on its waker.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(drain.open(), 3);
        let t0 = tokio::time::Instant::now();
        drain.shutdown().await;
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(200),
            "waits for the busiest"
        );
        assert_eq!(drain.open(), 0);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(drain
            .shared
            .wakers
            .lock()
            .wakers
            .iter()
            .all(Option::is_none));
        // Parked connections are polled when woken, not in a loop.
        assert!(polls.load(Ordering::Relaxed) <= 9, "{polls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_first_polled_after_the_shutdown_began_is_shut_down_too() {
        let drain = Arc::new(Drain::default());
        let polls = Arc::new(AtomicUsize::new(0));
        let conn = drain.watch(FakeConn::new(Duration::from_millis(30), polls.clone()));
        let d = drain.clone();
        let shutdown = tokio::spawn(async move { d.shutdown().await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !shutdown.is_finished(),
            "an unpolled watched connection counts"
        );
        conn.await.unwrap();
        shutdown.await.unwrap();
        assert_eq!(drain.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_connections_shutdown_is_immediate_and_slots_are_reused() {
        let drain = Drain::default();
        let polls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let mut conn = drain.watch(FakeConn::new(Duration::ZERO, polls.clone()));
            // Polled once (taking a slot), then dropped (freeing it).
            assert!(futures_poll_once(&mut conn).is_pending());
        }
        assert_eq!(
            drain.shared.wakers.lock().wakers.len(),
            1,
            "one slot, reused"
        );
        assert_eq!(drain.open(), 0);
        let t0 = tokio::time::Instant::now();
        drain.shutdown().await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }
}
