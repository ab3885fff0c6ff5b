//! OS scheduling of ingest threads beside training.

/// Moves the calling thread to the idle scheduling class (Linux `SCHED_IDLE`; nice 19
/// where that is refused): it runs on a core only when nothing else wants that core.
/// Beside training this is what ingest needs: training's fork-join kernels wait for
/// their slowest thread, and a background thread that shares a core for a time slice
/// (even at nice 19) stalls every parallel op behind it; an idle-class thread is
/// preempted at once. Ingest then uses the gaps training leaves (data waits, the
/// serial parts of a step), which is also where its latency comes from.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread's own id; `param` outlives the call.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0
            && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) != 0
        {
            tracing::debug!("could not lower an ingest thread's priority");
        }
    }
}
