//! hyper's HTTP/1 timer for one connection, which hyper uses only for the header read timeout
//! (`server.header_read_timeout_ms`): it makes a sleep when it starts reading a request head
//! and drops it when the head is in, so with tokio's timer every request made, registered and
//! deregistered a timer-wheel entry (about 1,000 instructions, see loadtest/README.md). Here
//! each connection keeps one tokio sleep, armed at the earliest deadline it has been asked
//! for, and a sleep hyper drops leaves it armed: when it fires for a deadline that has since
//! moved on (the request whose head it guarded is long answered), the next poll re-arms it for
//! the current deadline. So a busy connection touches the timer wheel about once per timeout
//! period instead of once per request, and a stalled head is still cut off at its deadline.

use hyper::rt::{Sleep, Timer};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// One connection's timer. Only for a connection whose hyper side holds at most one sleep at
/// a time (the HTTP/1 server's header read timeout): the armed sleep keeps one waker.
pub struct ConnTimer {
    armed: Arc<Mutex<Armed>>,
}

/// The connection's one tokio sleep, and the waker its last poll registered.
struct Armed {
    sleep: Pin<Box<tokio::time::Sleep>>,
    waker: Option<Waker>,
}

impl Default for ConnTimer {
    fn default() -> ConnTimer {
        // Not registered with the timer until first polled; re-armed on that poll.
        let idle = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        ConnTimer {
            armed: Arc::new(Mutex::new(Armed {
                sleep: Box::pin(idle),
                waker: None,
            })),
        }
    }
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(LazySleep {
            deadline: deadline.into(),
            armed: self.armed.clone(),
        })
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

/// A deadline of one sleep, served by the connection's armed sleep.
struct LazySleep {
    deadline: tokio::time::Instant,
    armed: Arc<Mutex<Armed>>,
}

impl Future for LazySleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut armed = self.armed.lock();
        let Armed { sleep, waker } = &mut *armed;
        if sleep.deadline() > self.deadline {
            // Armed for later (or not yet armed): this deadline comes first.
            sleep.as_mut().reset(self.deadline);
            *waker = None;
        } else if !sleep.is_elapsed() && waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Armed for this deadline or an earlier one, to wake this task: it will be polled
            // again then (the usual case, and cheaper than polling the tokio sleep).
            return Poll::Pending;
        }
        loop {
            match sleep.as_mut().poll(cx) {
                Poll::Pending => {
                    *waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(()) if sleep.deadline() >= self.deadline => return Poll::Ready(()),
                // It fired for an earlier deadline, one no sleep waits for any more.
                Poll::Ready(()) => sleep.as_mut().reset(self.deadline),
            }
        }
    }
}

impl Sleep for LazySleep {}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(s: &mut Pin<Box<dyn Sleep>>) -> Poll<()> {
        let waker = std::task::Waker::noop();
        s.as_mut().poll(&mut Context::from_waker(waker))
    }

    /// With the clock paused: each sleep is ready exactly at its own deadline, whether the
    /// shared sleep was armed for an earlier deadline (dropped sleeps), for a later one, or
    /// has fired for one nobody waits for any more.
    #[tokio::test(start_paused = true)]
    async fn each_sleep_ends_at_its_own_deadline() {
        let timer = ConnTimer::default();
        let t0 = timer.now();
        // A request's head guarded for 10 s, then answered: its sleep dropped while armed.
        let mut first = timer.sleep_until(t0 + Duration::from_secs(10));
        assert_eq!(poll(&mut first), Poll::Pending);
        drop(first);
        // The next head, 3 s later: not ready at the first deadline, ready at its own.
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut second = timer.sleep(Duration::from_secs(10));
        assert_eq!(poll(&mut second), Poll::Pending);
        tokio::time::advance(Duration::from_millis(7_500)).await;
        assert_eq!(
            poll(&mut second),
            Poll::Pending,
            "ended at the old deadline"
        );
        tokio::time::advance(Duration::from_millis(2_499)).await;
        assert_eq!(
            poll(&mut second),
            Poll::Pending,
            "ended before its deadline"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(poll(&mut second), Poll::Ready(()));
        // An earlier deadline than the armed one is honoured too.
        let mut late = timer.sleep(Duration::from_secs(60));
        assert_eq!(poll(&mut late), Poll::Pending);
        drop(late);
        let mut early = timer.sleep(Duration::from_secs(1));
        assert_eq!(poll(&mut early), Poll::Pending);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(poll(&mut early), Poll::Ready(()));
    }

    /// A sleep that is only polled once is still woken at its deadline (the armed sleep holds
    /// its waker), even when the armed sleep first fires for an older deadline.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_sleep_is_woken() {
        let timer = ConnTimer::default();
        let mut old = timer.sleep(Duration::from_secs(5));
        assert_eq!(poll(&mut old), Poll::Pending);
        drop(old);
        tokio::time::advance(Duration::from_secs(1)).await;
        let started = tokio::time::Instant::now();
        timer.sleep(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
