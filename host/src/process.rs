//! Native twin processes: spawning an interpreter with the protocol on
//! dedicated file descriptors, forwarding its stderr, and supervising it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
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
    /// The protocol on stdin and stdout instead of fds 3 and 4: for a
    /// program that carries the link elsewhere (`ssh` to a remote twin).
    pub protocol_on_stdio: bool,
}

/// A running twin: the child process and the master's ends of its pipes.
pub struct TwinProcess {
    child: Mutex<Child>,
    pid: u32,
    /// The process that started it (a forked child must not kill it).
    owner: u32,
    /// The master reads frames from the twin here.
    pub from_twin: PipeEnd,
    /// The master writes frames to the twin here.
    pub to_twin: PipeEnd,
    stderr_tail: Arc<Mutex<StderrTail>>,
}

/// One of the master's ends of a twin's pipes, which the master can close
/// while the handle lives (a stopped twin's descriptors are closed at once,
/// not when the last Python reference goes). Once closed, `as_raw_fd` is -1:
/// reads and writes fail with EBADF instead of reaching whatever file got
/// the number next. Whoever closes it must hold off the threads that use it
/// (python/twin.rs takes the reader and writer locks first).
pub struct PipeEnd {
    fd: AtomicI32,
}

impl PipeEnd {
    fn new(fd: OwnedFd) -> PipeEnd {
        PipeEnd {
            fd: AtomicI32::new(fd.into_raw_fd()),
        }
    }

    /// Closes it now (idempotent).
    pub fn close(&self) {
        let fd = self.fd.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: the descriptor was ours, and nobody can get its number any more
            unsafe { libc::close(fd) };
        }
    }

    pub fn is_closed(&self) -> bool {
        self.fd.load(Ordering::SeqCst) < 0
    }
}

impl AsRawFd for PipeEnd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.load(Ordering::SeqCst)
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        self.close();
    }
}

impl Read for &PipeEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: a buffer that lives for the call
        let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for &PipeEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: a buffer that lives for the call
        let n = unsafe { libc::write(self.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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
    // A large payload then crosses in a few writes, not one per 64 KiB (each
    // a switch between the two processes), while what is in flight stays in
    // the CPU's cache. Pages are taken only as data waits in the pipe. Best
    // effort: beyond the system's limits (an unprivileged user's
    // pipe-user-pages-soft), the default size stays.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The capacity asked for the pipes to and from a twin. 1 MiB (Linux's
/// default pipe-max-size) made a 1 MiB echo a fifth slower than 256 KiB: a
/// payload that waits whole in the pipe has left the cache when it is read.
const PIPE_SIZE: libc::c_int = 256 << 10;

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
    /// (read) and 4 (write), or as stdin and stdout (`protocol_on_stdio`);
    /// otherwise stdin is /dev/null, stdout is shared with the master, stderr is forwarded to the master's stderr by a thread that
    /// keeps the last few KiB to explain failures.
    pub fn spawn(spec: TwinCommand) -> Result<TwinProcess> {
        on_spawner_thread(move || Self::spawn_here(spec))
    }

    fn spawn_here(spec: TwinCommand) -> Result<TwinProcess> {
        let (twin_reads, master_writes) = pipe()?;
        let (master_reads, twin_writes) = pipe()?;
        let (child_in, child_out) = (twin_reads.as_raw_fd(), twin_writes.as_raw_fd());
        let (read_fd, write_fd) = if spec.protocol_on_stdio {
            (libc::STDIN_FILENO, libc::STDOUT_FILENO)
        } else {
            (TWIN_READ_FD, TWIN_WRITE_FD)
        };

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
                check(libc::dup2(high_in, read_fd))?;
                check(libc::dup2(high_out, write_fd))?;
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
        // in slices that let Ctrl-C through (pipe.rs, `write_some`)
        crate::pipe::set_nonblocking(master_writes.as_raw_fd())?;
        let pid = child.id();
        // the twin leads its own process group: its descendants are in it
        // unless they leave it; they must not outlive the twin (below) nor
        // the master (the keeper)
        keeper::watch_group(pid);
        live_groups().push(pid);
        let stderr_tail = Arc::new(Mutex::new(StderrTail::default()));
        let stderr = child.stderr.take();
        supervise(stderr, pid, Arc::clone(&stderr_tail));
        tracing::debug!(pid, executable = ?spec.executable, "spawned twin");
        Ok(TwinProcess {
            child: Mutex::new(child),
            pid,
            owner: std::process::id(),
            from_twin: PipeEnd::new(master_reads),
            to_twin: PipeEnd::new(master_writes),
            stderr_tail,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this is a child forked from the process that started the
    /// twin: the twin is not its own, and a lock of this handle that a
    /// thread of the parent held at the fork stays held here forever, so
    /// nothing here may wait for one.
    fn forked(&self) -> bool {
        std::process::id() != self.owner
    }

    fn not_ours(&self) -> HostError {
        HostError::Terminated(format!(
            "twin process {} belongs to the process that started it (pid {}), not to this one \
             forked from it",
            self.pid, self.owner
        ))
    }

    /// Locks the stderr tail, or in a forked child only tries (see `forked`).
    fn tail(&self) -> Option<std::sync::MutexGuard<'_, StderrTail>> {
        if !self.forked() {
            return Some(self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()));
        }
        match self.stderr_tail.try_lock() {
            Ok(tail) => Some(tail),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The exit status, if the twin has ended.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        if self.forked() {
            return Err(self.not_ours());
        }
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
        if self.forked() {
            return Err(self.not_ours());
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
        let Some(tail) = self.tail() else {
            return String::new();
        };
        String::from_utf8_lossy(&tail.bytes.iter().copied().collect::<Vec<u8>>())
            .trim_end()
            .to_string()
    }

    /// Like `stderr_tail`, after waiting up to `timeout` for the twin (and
    /// anything it started) to close its stderr, so nothing is missed.
    pub fn stderr_tail_when_closed(&self, timeout: Duration) -> String {
        self.stderr_forwarded(timeout);
        self.stderr_tail()
    }

    /// Waits up to `timeout` for the twin (and anything it started) to close
    /// its stderr, everything it wrote forwarded to the master's; whether it did.
    pub fn stderr_forwarded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.tail() {
                Some(tail) if tail.closed => return true,
                None => return false,
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
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

/// Opens a descriptor that becomes readable when process `pid` ends (Linux
/// >= 5.3); None where the kernel has no pidfd.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a system call that returns a new descriptor or -1
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The process groups of this process's twins that have not ended (their
/// supervisor removes them), for `kill_all_groups`.
fn live_groups() -> std::sync::MutexGuard<'static, Vec<u32>> {
    static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills every twin of this process and what it started, those still
/// starting included: the master's exit does it last, so that no thread is
/// left inside a start (waiting for a hello) when the interpreter finalizes.
pub fn kill_all_groups() {
    let groups = live_groups().clone();
    for pid in groups {
        kill_group(pid);
    }
}

/// Kills what is left of the process group of twin `pid` (its descendants).
fn kill_group(pid: u32) {
    // SAFETY: a signal to a process group that exists while any of its members
    // does (its number cannot be reused meanwhile)
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// One thread per twin: forwards the twin's stderr to the master's (keeping
/// the tail for error messages) and watches the twin's end. When the twin
/// ends, whatever it started in its process group is killed: a descendant
/// (a fork, a helper started by a wrapper script) would otherwise keep the
/// protocol pipes open, and the master would see the end of the stream only
/// when that descendant exits. Without a pidfd (old kernels), the end is
/// seen when the twin's stderr closes, which such a descendant delays too.
fn supervise(stderr: Option<impl Read + AsRawFd + Send + 'static>, pid: u32, tail: Arc<Mutex<StderrTail>>) {
    let pidfd = pidfd_open(pid);
    let spawned = thread::Builder::new()
        .name(format!("cpy2py-twin-{pid}"))
        .spawn(move || {
            let mut stderr = stderr;
            let mut ended = false;
            let mut buf = [0u8; 8192];
            loop {
                let mut fds = [
                    libc::pollfd {
                        fd: stderr.as_ref().map_or(-1, |s| s.as_raw_fd()),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: if ended {
                            -1
                        } else {
                            pidfd.as_ref().map_or(-1, |p| p.as_raw_fd())
                        },
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                if fds[0].fd < 0 && fds[1].fd < 0 {
                    break;
                }
                // SAFETY: two pollfds that live for the call
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                if fds[1].revents != 0 {
                    ended = true;
                    kill_group(pid);
                    live_groups().retain(|&p| p != pid);
                    keeper::forget_group(pid);
                }
                if fds[0].revents == 0 {
                    continue;
                }
                let Some(reader) = stderr.as_mut() else { continue };
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        stderr = None;
                        tail.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                        if pidfd.is_none() {
                            break;
                        }
                        continue;
                    }
                    Ok(n) => n,
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
        tracing::warn!(pid, "cannot supervise the twin: {e}");
    }
}

/// The keeper: a small process that outlives the master by a moment, to kill
/// the process groups of its twins when the master ends in a way that runs
/// none of its code (SIGKILL, SIGTERM, a crash). The twins themselves die of
/// their parent-death signal, but what they started would live on. The
/// master tells the keeper each group on a pipe (`+pgid`, `-pgid` once it is
/// gone); when the pipe closes (the master ended), the keeper kills the groups
/// still listed. It is /bin/sh, in its own process group (a Ctrl-C in the
/// terminal does not reach it); without /bin/sh there is no keeper, and
/// descendants of twins may outlive a master that is killed.
mod keeper {
    use super::*;

    const SCRIPT: &str = r#"
groups=""
while read -r line; do
  case "$line" in
    +*) groups="$groups ${line#+}" ;;
    -*) kept=""; for g in $groups; do [ "$g" = "${line#-}" ] || kept="$kept $g"; done; groups="$kept" ;;
  esac
done
for g in $groups; do kill -9 "-$g" 2>/dev/null; done
"#;

    /// The write end of the keeper's pipe, in the process that started it;
    /// -1 before it is started or where it could not be.
    static PIPE: AtomicI32 = AtomicI32::new(-1);
    static STATE: Mutex<Option<u32>> = Mutex::new(None);

    /// A child forked from the master (multiprocessing) must not hold the
    /// keeper's pipe open (the keeper would wait for it too): it closes its
    /// copy, and starts a keeper of its own for twins of its own.
    extern "C" fn after_fork_in_child() {
        let fd = PIPE.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: async-signal-safe close of our own copy
            unsafe { libc::close(fd) };
        }
    }

    fn ensure_started() -> RawFd {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let here = std::process::id();
        if *state == Some(here) {
            return PIPE.load(Ordering::SeqCst);
        }
        if state.is_none() {
            // SAFETY: registers a handler that only closes a descriptor
            unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        }
        *state = Some(here);
        let fd = start().unwrap_or_else(|e| {
            tracing::warn!("no keeper for the twins' process groups: {e}");
            -1
        });
        PIPE.store(fd, Ordering::SeqCst);
        fd
    }

    fn start() -> io::Result<RawFd> {
        let (keeper_reads, master_writes) = pipe()?;
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", SCRIPT])
            .stdin(Stdio::from(keeper_reads))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = command.spawn()?;
        // it lives as long as the master (and a moment longer): never waited for
        std::mem::forget(child);
        let fd = master_writes.into_raw_fd();
        // a keeper that stopped reading must never block the master
        crate::pipe::set_nonblocking(fd)?;
        Ok(fd)
    }

    fn tell(line: String) {
        let fd = ensure_started();
        if fd >= 0 {
            // SAFETY: a short write (atomic on a pipe) of a live buffer
            unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
        }
    }

    /// Twin `pid` leads a new process group.
    pub fn watch_group(pid: u32) {
        tell(format!("+{pid}\n"));
    }

    /// The group of twin `pid` was killed: nothing is left to do for it.
    pub fn forget_group(pid: u32) {
        if PIPE.load(Ordering::SeqCst) >= 0 {
            tell(format!("-{pid}\n"));
        }
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
    fn a_killed_twin_ends_its_stream_even_with_a_descendant_holding_it() {
        // the helper (in the twin's process group) holds fds 3 and 4 open
        let twin = TwinProcess::spawn(sh("sleep 60 & echo $! >&4; wait")).unwrap();
        let mut line = [0u8; 16];
        let n = (&twin.from_twin).read(&mut line).unwrap();
        let helper: i32 = std::str::from_utf8(&line[..n]).unwrap().trim().parse().unwrap();
        twin.kill().unwrap();
        // end of stream, not a wait of 60 s for the helper
        let mut rest = Vec::new();
        (&twin.from_twin).read_to_end(&mut rest).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while unsafe { libc::kill(helper, 0) } == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(
            unsafe { libc::kill(helper, 0) },
            0,
            "the twin's helper outlived it"
        );
    }

    #[test]
    fn kill_reports_the_signal() {
        let twin = TwinProcess::spawn(sh("sleep 30")).unwrap();
        let status = twin.kill().unwrap();
        assert_eq!(describe_status(status), "was killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn a_forked_child_never_waits_for_a_lock_held_at_the_fork() {
        let twin = TwinProcess::spawn(sh("echo 'it broke' >&2; sleep 5")).unwrap();
        // as if the stderr thread were adding a line when the master forked
        let held = twin.stderr_tail.lock().unwrap();
        // SAFETY: the child only reads the handle and leaves with _exit
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe { libc::alarm(5) }; // a wait that hangs ends the child here
            let answers = twin.stderr_tail().is_empty()
                && !twin.stderr_forwarded(Duration::from_secs(1))
                && matches!(twin.try_status(), Err(HostError::Terminated(_)))
                && matches!(twin.kill(), Err(HostError::Terminated(_)));
            unsafe { libc::_exit(if answers { 0 } else { 1 }) };
        }
        drop(held);
        let mut status = 0;
        // SAFETY: waits for the child forked above
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "the child hung (status {status:#x})");
        assert_eq!(libc::WEXITSTATUS(status), 0);
        assert_eq!(twin.try_status().unwrap(), None, "the parent's twin runs on");
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
        let inode = |end: &PipeEnd| {
            std::fs::metadata(format!("/proc/self/fd/{}", end.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let inodes = [inode(&first.from_twin), inode(&first.to_twin)];
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
