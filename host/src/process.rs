//! Native twin processes: spawning an interpreter with the protocol on
//! dedicated file descriptors, forwarding its stderr, and supervising it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{HostError, Result};

/// File descriptor numbers on which a twin finds the protocol.
pub const TWIN_READ_FD: RawFd = 3;
pub const TWIN_WRITE_FD: RawFd = 4;

/// How much of a twin's recent stderr is kept to explain a failure.
const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct TwinCommand {
    pub executable: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
}

/// A running twin: the child process and the master's ends of its pipes.
pub struct TwinProcess {
    child: Mutex<Child>,
    pid: u32,
    /// The process that started it (a forked child must not kill it).
    owner: u32,
    /// The master reads frames from the twin here.
    pub from_twin: File,
    /// The master writes frames to the twin here.
    pub to_twin: File,
    stderr_tail: Arc<Mutex<StderrTail>>,
}

/// The end of what a twin wrote to stderr, and whether it closed stderr.
#[derive(Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
    closed: bool,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // O_CLOEXEC: no other child of the master inherits this twin's pipes
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Runs `job` on one long-lived thread. A twin gets SIGKILL when the thread
/// that forked it ends (PR_SET_PDEATHSIG follows the thread, not the
/// process), so twins are forked from a thread that lives as long as the
/// master.
fn on_spawner_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    type Job = Box<dyn FnOnce() + Send>;
    /// The spawner thread's queue, and the process it runs in: a child forked
    /// from the master has no threads but the forking one, so it starts its own.
    static SPAWNER: Mutex<Option<(u32, mpsc::Sender<Job>)>> = Mutex::new(None);
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(job());
    });
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        let here = std::process::id();
        if !matches!(&*spawner, Some((pid, _)) if *pid == here) {
            let (jobs, queue) = mpsc::channel::<Job>();
            thread::Builder::new()
                .name("cpy2py-spawner".into())
                .spawn(move || queue.into_iter().for_each(|job| job()))
                .expect("cannot start the cpy2py spawner thread");
            *spawner = Some((here, jobs));
        }
        let (_, jobs) = spawner.as_ref().expect("the spawner was just started");
        jobs.send(job).expect("spawner thread is gone");
    }
    rx.recv().expect("spawner thread dropped a job")
}

impl TwinProcess {
    /// Starts the twin. The protocol pipes appear in the child as fds 3
    /// (read) and 4 (write); stdin is /dev/null, stdout is shared with the
    /// master, stderr is forwarded to the master's stderr by a thread that
    /// keeps the last few KiB to explain failures.
    pub fn spawn(spec: TwinCommand) -> Result<TwinProcess> {
        on_spawner_thread(move || Self::spawn_here(spec))
    }

    fn spawn_here(spec: TwinCommand) -> Result<TwinProcess> {
        let (twin_reads, master_writes) = pipe()?;
        let (master_reads, twin_writes) = pipe()?;
        let (child_in, child_out) = (twin_reads.as_raw_fd(), twin_writes.as_raw_fd());

        let mut command = Command::new(&spec.executable);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            // its own process group: a Ctrl-C in the terminal goes to the
            // master only, which then stops its twins in order
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        unsafe {
            command.pre_exec(move || {
                // Move both ends above the target numbers first, so that
                // placing one cannot overwrite the other; dup2 clears
                // O_CLOEXEC on the copies, which the twin then inherits.
                let high_in = check(libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10))?;
                let high_out = check(libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10))?;
                check(libc::dup2(high_in, TWIN_READ_FD))?;
                check(libc::dup2(high_out, TWIN_WRITE_FD))?;
                // die with the master, even if it is killed
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            HostError::Spawn(format!(
                "cannot start twinterpreter executable {:?}: {e}",
                spec.executable
            ))
        })?;
        drop((twin_reads, twin_writes));
        // the master's writes never block: a full pipe is waited for with poll,
        // in slices that let Ctrl-C through (python/twin.rs, `write_some`)
        // SAFETY: flags of a descriptor this function owns
        unsafe {
            let fd = master_writes.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(StderrTail::default()));
        if let Some(stderr) = child.stderr.take() {
            forward_stderr(stderr, pid, Arc::clone(&stderr_tail));
        }
        tracing::debug!(pid, executable = ?spec.executable, "spawned twin");
        Ok(TwinProcess {
            child: Mutex::new(child),
            pid,
            owner: std::process::id(),
            from_twin: File::from(master_reads),
            to_twin: File::from(master_writes),
            stderr_tail,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status, if the twin has ended.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        Ok(self.child().try_wait()?)
    }

    /// Waits up to `timeout` for the twin to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills the twin (SIGKILL) and reaps it. In a child forked from the
    /// master the twin is the parent's: it is left alone.
    pub fn kill(&self) -> Result<ExitStatus> {
        if std::process::id() != self.owner {
            return Err(HostError::Terminated(format!(
                "twin process {} belongs to the process that started it (pid {}), not to this one \
                 forked from it",
                self.pid, self.owner
            )));
        }
        let mut child = self.child();
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        child.kill()?;
        Ok(child.wait()?)
    }

    /// The last lines the twin wrote to stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&tail.bytes.iter().copied().collect::<Vec<u8>>())
            .trim_end()
            .to_string()
    }

    /// Like `stderr_tail`, after waiting up to `timeout` for the twin (and
    /// anything it started) to close its stderr, so nothing is missed.
    pub fn stderr_tail_when_closed(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while !self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()).closed && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
        self.stderr_tail()
    }
}

impl Drop for TwinProcess {
    fn drop(&mut self) {
        // a twin never outlives its handle
        let _ = self.kill();
    }
}

/// How a process ended, in words.
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.signal() {
        format!("was killed by signal {signal} ({})", signal_name(signal))
    } else {
        format!("ended ({status})")
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

fn forward_stderr(mut stderr: impl Read + Send + 'static, pid: u32, tail: Arc<Mutex<StderrTail>>) {
    let spawned = thread::Builder::new()
        .name(format!("cpy2py-stderr-{pid}"))
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match stderr.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let _ = io::stderr().write_all(&buf[..n]);
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.bytes.extend(&buf[..n]);
                let excess = tail.bytes.len().saturating_sub(STDERR_TAIL_BYTES);
                tail.bytes.drain(..excess);
            }
            tail.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, "cannot forward the twin's stderr: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame;

    fn sh(script: &str) -> TwinCommand {
        TwinCommand {
            executable: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }
    }

    #[test]
    fn protocol_runs_on_fds_3_and_4_not_stdio() {
        // a child that echoes one frame from fd 3 back on fd 4, and prints
        let twin = TwinProcess::spawn(sh("echo noise; head -c 7 <&3 >&4")).unwrap();
        let mut to = &twin.to_twin;
        frame::write_frame(&mut to, b"\x83\x01\x02\x03").unwrap();
        // the 4-byte header + 4-byte payload, cut at 7 by head
        let mut back = Vec::new();
        (&twin.from_twin).read_to_end(&mut back).unwrap();
        assert_eq!(back, [0, 0, 0, 4, 0x83, 1, 2]);
        assert!(twin
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .success());
    }

    #[test]
    fn end_of_stream_when_twin_exits() {
        let twin = TwinProcess::spawn(sh("exit 3")).unwrap();
        let mut input = &twin.from_twin;
        assert!(frame::read_frame(&mut input, 1024).unwrap().is_none());
        let status = twin.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(describe_status(status), "exited with status 3");
    }

    #[test]
    fn kill_reports_the_signal() {
        let twin = TwinProcess::spawn(sh("sleep 30")).unwrap();
        let status = twin.kill().unwrap();
        assert_eq!(describe_status(status), "was killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn stderr_tail_is_kept() {
        let twin = TwinProcess::spawn(sh("echo 'it broke' >&2")).unwrap();
        twin.wait_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(twin.stderr_tail_when_closed(Duration::from_secs(5)), "it broke");
    }

    #[test]
    fn missing_executable_is_a_spawn_error() {
        let err = TwinProcess::spawn(TwinCommand {
            executable: "/nonexistent/python".into(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(matches!(err, HostError::Spawn(_)));
        assert!(err.to_string().contains("/nonexistent/python"));
    }

    #[test]
    fn master_fds_are_not_inherited_by_other_twins() {
        use std::os::unix::fs::MetadataExt;
        let first = TwinProcess::spawn(sh("sleep 30")).unwrap();
        let inodes = [
            first.from_twin.metadata().unwrap().ino(),
            first.to_twin.metadata().unwrap().ino(),
        ];
        // a second child lists what its fds point to
        let second = TwinProcess::spawn(sh("ls -l /proc/$$/fd >&4")).unwrap();
        let mut out = String::new();
        (&second.from_twin).read_to_string(&mut out).unwrap();
        for inode in inodes {
            assert!(
                !out.contains(&format!("pipe:[{inode}]")),
                "first twin's pipe leaked: {out}"
            );
        }
        first.kill().unwrap();
    }
}
