//! Exits the process when the store stops completing writes.
//!
//! sled 0.34 can deadlock internally: its log-file truncation is queued on the same thread pool
//! whose threads wait for the lock held by the thread that waits for the truncation (fixed only
//! in sled's unreleased 1.0 line). Every store operation then hangs forever and the service looks
//! alive while it records nothing. Nothing inside the process can undo it, so a watchdog thread
//! checks every `limit / 4` that a small write and a flush complete; when one has not completed
//! within `limit`, it logs why and exits with status 70, and the supervisor (systemd's
//! `Restart=`) starts the service again. What was flushed is safe; sled recovers on open.

use std::sync::mpsc;
use std::time::Duration;

/// Stops the watchdog when dropped (and with it the probe, which holds the store open).
pub struct Watchdog {
    _stop: mpsc::Sender<()>,
}

/// Runs `probe` on a thread of its own every `limit / 4`; calls `on_stall` (once) if a probe
/// has not returned within `limit`. Returns at once; the threads run until the guard is dropped.
pub fn watch<P, S>(limit: Duration, probe: P, on_stall: S) -> Watchdog
where
    P: Fn() -> Result<(), String> + Send + 'static,
    S: FnOnce(String) + Send + 'static,
{
    let (stop, stopped) = mpsc::channel::<()>();
    let guard = Watchdog { _stop: stop };
    let (request, requests) = mpsc::channel::<()>();
    let (done, results) = mpsc::channel::<Result<(), String>>();
    let spawned = std::thread::Builder::new()
        .name("store-probe".into())
        .spawn(move || {
            while requests.recv().is_ok() {
                if done.send(probe()).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "store watchdog not started");
        return guard;
    }
    let period = (limit / 4).max(Duration::from_millis(10));
    let watcher = std::thread::Builder::new()
        .name("store-watchdog".into())
        .spawn(move || loop {
            // Waits out the period; the guard's drop ends the wait (and the watchdog) at once.
            if !matches!(
                stopped.recv_timeout(period),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            if request.send(()).is_err() {
                return;
            }
            match results.recv_timeout(limit) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "store probe failed"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    on_stall(format!(
                        "a store write and flush did not complete within {}",
                        humantime::format_duration(limit)
                    ));
                    return;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        });
    if let Err(e) = watcher {
        tracing::error!(error = %e, "store watchdog not started");
    }
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_that_never_returns_is_reported_once() {
        let (tx, rx) = mpsc::channel();
        let _guard = watch(
            Duration::from_millis(100),
            || {
                std::thread::park();
                Ok(())
            },
            move |why| tx.send(why).unwrap(),
        );
        let why = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("stall reported");
        assert!(why.contains("did not complete within 100ms"), "{why}");
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "only once"
        );
    }

    #[test]
    fn a_probe_that_answers_is_not_a_stall() {
        let (tx, rx) = mpsc::channel();
        let (probed, probes) = mpsc::channel();
        let guard = watch(
            Duration::from_millis(100),
            move || {
                let _ = probed.send(());
                Ok(())
            },
            move |why| tx.send(why).unwrap(),
        );
        // Several probes complete...
        for _ in 0..4 {
            probes
                .recv_timeout(Duration::from_secs(10))
                .expect("probed");
        }
        // ...and none was a stall.
        assert!(rx.try_recv().is_err());
        // Dropping the guard stops the probes (and frees what the probe holds).
        drop(guard);
        while probes.recv_timeout(Duration::from_secs(10)).is_ok() {}
    }
}
