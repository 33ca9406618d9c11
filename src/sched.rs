//! Linux scheduling policies for Keygate's own threads, set through `thread-priority` (the
//! crate forbids `unsafe`): the async workers under `SCHED_BATCH` during a signing backlog
//! (`app`), the store writer under `SCHED_IDLE` while it keeps up (`store::writer`).

/// The policies Keygate puts its threads under, always at nice 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER`, the default.
    Other,
    /// `SCHED_BATCH`: same share of the CPU, but its wake-ups do not preempt the running thread.
    Batch,
    /// `SCHED_IDLE`: runs only when nothing else on its core wants to, and any other thread
    /// woken there preempts it at once.
    Idle,
}

/// Puts the calling thread under `policy` at nice 0.
pub fn set_current(policy: Policy) -> Result<(), thread_priority::Error> {
    set(thread_priority::thread_native_id(), policy)
}

fn set(thread: thread_priority::ThreadId, policy: Policy) -> Result<(), thread_priority::Error> {
    use thread_priority::{
        set_thread_priority_and_policy, NormalThreadSchedulePolicy, ThreadPriority,
        ThreadPriorityValue, ThreadSchedulePolicy,
    };
    // The crate also sets the nice value, from a 0–99 scale mapped onto 19..-20: 48 is nice 0,
    // the default (the tests below check it).
    let nice_0 = ThreadPriorityValue::try_from(48u8)
        .map_err(|_| thread_priority::Error::Priority("48 is a valid value"))?;
    set_thread_priority_and_policy(
        thread,
        ThreadPriority::Crossplatform(nice_0),
        ThreadSchedulePolicy::Normal(match policy {
            Policy::Other => NormalThreadSchedulePolicy::Other,
            Policy::Batch => NormalThreadSchedulePolicy::Batch,
            Policy::Idle => NormalThreadSchedulePolicy::Idle,
        }),
    )
}

/// The calling thread's id as Linux numbers it (`/proc/self/task/<tid>`), from the
/// `/proc/thread-self` link ("<pid>/task/<tid>").
pub fn current_tid() -> Option<u64> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The calling thread's handle, for `set_thread`.
pub fn current_thread() -> u64 {
    thread_priority::thread_native_id() as u64
}

/// Puts another thread of this process (`current_thread` there) under `policy`. The crate
/// also sets the nice value of the calling thread (it calls `setpriority` for the caller) to
/// 0, which Keygate's threads have anyway.
pub fn set_thread(thread: u64, policy: Policy) -> Result<(), thread_priority::Error> {
    set(thread as thread_priority::ThreadId, policy)
}

/// Whether a thread of this process may leave `SCHED_IDLE` again. Linux treats `SCHED_IDLE`
/// as nice 20 and lets a thread return to nice 0 only with `CAP_SYS_NICE` or an
/// `RLIMIT_NICE` of at least 20; without them a thread put under it would stay there for
/// good. Tried on a short-lived thread of its own, so nothing else is left behind.
pub fn can_leave_idle() -> bool {
    std::thread::Builder::new()
        .name("keygate-probe".into())
        .spawn(|| set_current(Policy::Idle).is_ok() && set_current(Policy::Other).is_ok())
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

/// The calling thread's policy (the 41st field of `/proc/thread-self/stat`: 0 `SCHED_OTHER`,
/// 3 `SCHED_BATCH`, 5 `SCHED_IDLE`) and nice value (the 19th), for tests.
#[cfg(test)]
pub(crate) fn policy_and_nice() -> (i64, i64) {
    policy_and_nice_of("/proc/thread-self/stat")
}

/// The same for the thread whose `stat` file is at `path`.
#[cfg(test)]
pub(crate) fn policy_and_nice_of(path: &str) -> (i64, i64) {
    let stat = std::fs::read_to_string(path).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest: Vec<i64> = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .map(|f| f.trim().parse().unwrap_or(-1))
        .collect();
    (rest[41 - 3], rest[19 - 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_is_set_at_nice_0_and_left_again() {
        std::thread::spawn(|| {
            assert_eq!(
                policy_and_nice(),
                (0, 0),
                "SCHED_OTHER at nice 0 to begin with"
            );
            set_current(Policy::Batch).unwrap();
            assert_eq!(policy_and_nice(), (3, 0), "SCHED_BATCH is 3");
            set_current(Policy::Other).unwrap();
            assert_eq!(policy_and_nice(), (0, 0), "back to SCHED_OTHER");
            // With CAP_SYS_NICE (root outside a container: CI) the probe must say yes.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let cap_eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap();
            let sys_nice = cap_eff & (1 << 23) != 0;
            let can = can_leave_idle();
            assert!(!sys_nice || can, "CAP_SYS_NICE, yet no way back");
            if can {
                set_current(Policy::Idle).unwrap();
                assert_eq!(policy_and_nice().0, 5, "SCHED_IDLE is 5");
                set_current(Policy::Other).unwrap();
                assert_eq!(policy_and_nice(), (0, 0), "and back");
            }
        })
        .join()
        .unwrap();
    }
}
