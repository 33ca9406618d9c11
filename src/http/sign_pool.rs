//! Dedicated signing threads. An RSA-2048 signature costs a few hundred microseconds of CPU;
//! run on a tokio worker it would stall every connection on that worker meanwhile. Handlers
//! hand the work here and await the result, so async workers only ever do short steps.
//!
//! The pool also says when signatures wait in its queue (`backlog`): the workers then run so
//! that their wake-ups do not preempt a signature in progress (`app::follow_signing_backlog`).

use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// How long a signing thread waits for the next job before the backlog counts as over: the
/// queue empties for moments even under a steady stream of new machines, and the workers
/// should not switch policy at each of them.
const BACKLOG_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

pub struct SignPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the signing pool has stopped")]
pub struct PoolStopped;

impl SignPool {
    /// `threads` workers (0 = one per core) sharing a queue of `queue` jobs; senders wait
    /// (asynchronously) when it is full. `backlog` is set when a thread takes a job with more
    /// waiting behind it, and cleared when a thread has found no job for `BACKLOG_LINGER`.
    pub fn new(threads: usize, queue: usize, backlog: Arc<AtomicBool>) -> SignPool {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let (tx, rx): (Sender<Job>, Receiver<Job>) = bounded(queue.max(1));
        let threads = (0..n)
            .map(|i| {
                let rx = rx.clone();
                let backlog = backlog.clone();
                std::thread::Builder::new()
                    .name(format!("keygate-sign-{i}"))
                    .spawn(move || loop {
                        let job = match rx.recv_timeout(BACKLOG_LINGER) {
                            Ok(job) => job,
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                                backlog.store(false, Ordering::Relaxed);
                                match rx.recv() {
                                    Ok(job) => job,
                                    Err(_) => break,
                                }
                            }
                            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                        };
                        // More jobs behind this one: the thread has its core's work for a while.
                        if !rx.is_empty() {
                            backlog.store(true, Ordering::Relaxed);
                        }
                        job();
                    })
                    .expect("spawning a signing thread")
            })
            .collect();
        SignPool {
            jobs: Some(tx),
            threads,
        }
    }

    /// Runs `f` on a signing thread and waits for its result without blocking the caller's
    /// async worker.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolStopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let jobs = self.jobs.as_ref().ok_or(PoolStopped)?;
        // Usually there is room; when there is not, yield until there is.
        loop {
            match jobs.try_send(job) {
                Ok(()) => break,
                Err(crossbeam_channel::TrySendError::Full(j)) => {
                    job = j;
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(PoolStopped),
            }
        }
        rx.await.map_err(|_| PoolStopped)
    }
}

impl Drop for SignPool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn runs_jobs_off_the_runtime_thread_and_loses_none() {
        let pool = std::sync::Arc::new(SignPool::new(2, 1, Default::default()));
        let here = std::thread::current().id();
        let there = pool.run(move || std::thread::current().id()).await.unwrap();
        assert_ne!(here, there);
        // Many more concurrent jobs than queue slots and threads: all complete.
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    pool.run(move || {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        i * 2
                    })
                    .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap().unwrap());
        }
        assert_eq!(results, (0..50).map(|i| i * 2).collect::<Vec<_>>());
    }

    /// The backlog flag is up while jobs wait behind the one being signed, and down again
    /// once the threads have found nothing to do for `BACKLOG_LINGER`.
    #[tokio::test(flavor = "current_thread")]
    async fn the_backlog_flag_follows_waiting_jobs() {
        let backlog = Arc::new(AtomicBool::new(false));
        let pool = Arc::new(SignPool::new(1, 8, backlog.clone()));
        pool.run(|| ()).await.unwrap();
        assert!(
            !backlog.load(Ordering::Relaxed),
            "one job alone is no backlog"
        );
        // Three slow jobs at once: the second is taken with the third waiting behind it
        // (50 ms each, so that the test thread preempted between queueing them still is).
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (pool, backlog) = (pool.clone(), backlog.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        backlog.load(Ordering::Relaxed)
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        assert!(
            seen.contains(&true),
            "no job ran during a backlog: {seen:?}"
        );
        let idle_since = std::time::Instant::now();
        while backlog.load(Ordering::Relaxed) {
            assert!(
                idle_since.elapsed() < std::time::Duration::from_secs(5),
                "still up 5 s after the last job"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
