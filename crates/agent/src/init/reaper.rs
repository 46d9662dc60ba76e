//! PID 1's only job after setup: reap orphans and keep an agent alive.

use std::time::Duration;

use crate::log;

/// Pause before a crashed agent is started again, so a crash loop does
/// not eat the guest's CPU.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

/// Forks `agent` as a child, reaps every process that ends in the
/// guest, and forks a new agent whenever the current one dies. Never
/// returns.
///
/// Must be called while the process is single-threaded (no runtime
/// started yet): only then is `fork` without `exec` sound.
pub fn supervise(agent: fn() -> i32) -> ! {
    loop {
        let pid = fork_agent(agent);
        if pid > 0 {
            reap_until(pid);
        }
        std::thread::sleep(RESTART_PAUSE);
    }
}

fn fork_agent(agent: fn() -> i32) -> libc::pid_t {
    // SAFETY: the caller guarantees we are single-threaded, so the
    // child's copy of the address space is consistent (no lock held by
    // a vanished thread).
    #[allow(unsafe_code)]
    let pid = unsafe { libc::fork() };
    match pid {
        0 => std::process::exit(agent()),
        -1 => {
            let e = std::io::Error::last_os_error();
            log::warn(format_args!("fork agent: {e}"));
        }
        _ => {}
    }
    pid
}

/// Reaps children until `agent` is among them.
fn reap_until(agent: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the whole call.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            log::warn(format_args!("agent exited ({status:#x}); restarting"));
            return;
        }
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                // ECHILD: the agent is gone without us seeing it.
                return;
            }
        }
    }
}
