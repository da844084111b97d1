//! sd_notify, spoken directly over the datagram socket systemd names in
//! NOTIFY_SOCKET: READY=1, STATUS=..., STOPPING=1, WATCHDOG=1.
//!
//! The environment is read once by the caller and passed in, so tests can point
//! the notifier at their own socket without touching the process environment.
//! Every send is best effort: a lost datagram is logged, never fatal, because
//! the agent must run the same with or without systemd.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where systemd-run is looked for, in order.
pub const SYSTEMD_RUN_PATHS: [&str; 2] = ["/usr/bin/systemd-run", "/bin/systemd-run"];

/// Whether systemd is this host's init, as sd_booted(3) checks:
/// /run/systemd/system is a directory. Installed but not PID 1 (containers,
/// CI) is false.
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Where systemd-run is installed, if it is.
pub fn systemd_run() -> Option<&'static Path> {
    SYSTEMD_RUN_PATHS.iter().map(Path::new).find(|p| p.exists())
}

/// Where notifications go, read from NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID.
#[derive(Debug, Clone, Default)]
pub struct NotifyEnv {
    pub notify_socket: Option<String>,
    pub watchdog_usec: Option<String>,
    pub watchdog_pid: Option<String>,
}

impl NotifyEnv {
    /// Reads the three variables from the process environment.
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self { notify_socket: var("NOTIFY_SOCKET"), watchdog_usec: var("WATCHDOG_USEC"), watchdog_pid: var("WATCHDOG_PID") }
    }
}

/// Sends notifications to systemd, or does nothing when not started by it.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
    watchdog_interval: Option<Duration>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    pub fn new(env: &NotifyEnv) -> Self {
        let target = env.notify_socket.as_deref().and_then(|socket| {
            let target = match socket.strip_prefix('@') {
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                None if socket.starts_with('/') => Target::Path(PathBuf::from(socket)),
                None => {
                    tracing::warn!(notify_socket = socket, "NOTIFY_SOCKET is neither a path nor abstract; not notifying");
                    return None;
                }
            };
            match UnixDatagram::unbound() {
                Ok(sock) => Some((sock, target)),
                Err(error) => {
                    tracing::warn!(%error, "cannot create the sd_notify socket; not notifying");
                    None
                }
            }
        });
        Self { target, watchdog_interval: watchdog_interval(env, std::process::id()) }
    }

    /// How often to send WATCHDOG=1: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_interval
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn status(&self, text: &str) {
        // One line: a newline would start a new assignment in the datagram.
        let line: String = text.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        self.send(&format!("STATUS={line}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        let Some((sock, target)) = &self.target else { return };
        let sent = match target {
            Target::Path(path) => sock.send_to(message.as_bytes(), path),
            Target::Abstract(name) => send_abstract(sock, name, message.as_bytes()),
        };
        if let Err(error) = sent {
            tracing::warn!(%error, message, "sd_notify failed");
        }
    }
}

fn send_abstract(sock: &UnixDatagram, name: &[u8], message: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(message, &addr)
}

/// The fastest the agent pings the watchdog. WATCHDOG_USEC of a few
/// microseconds is a unit-file mistake: half of it would be a zero-length
/// ticker (which panics) or a busy loop; pinging every 10 ms is the most that
/// is still cheap, and systemd then reports the too-short timeout, not us.
pub const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(10);

/// Half of WATCHDOG_USEC (at least [`MIN_WATCHDOG_INTERVAL`]), unless WATCHDOG_PID names another process.
fn watchdog_interval(env: &NotifyEnv, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = &env.watchdog_pid {
        if pid.parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = env.watchdog_usec.as_deref()?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(MIN_WATCHDOG_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(usec: Option<&str>, pid: Option<&str>) -> NotifyEnv {
        NotifyEnv { notify_socket: None, watchdog_usec: usec.map(String::from), watchdog_pid: pid.map(String::from) }
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process_only() {
        assert_eq!(watchdog_interval(&env(Some("20000000"), None), 42), Some(Duration::from_secs(10)));
        assert_eq!(watchdog_interval(&env(Some("20000000"), Some("42")), 42), Some(Duration::from_secs(10)));
        assert_eq!(watchdog_interval(&env(Some("20000000"), Some("43")), 42), None);
        assert_eq!(watchdog_interval(&env(Some("zero"), None), 42), None);
        assert_eq!(watchdog_interval(&env(Some("0"), None), 42), None);
        assert_eq!(watchdog_interval(&env(None, None), 42), None);
    }

    #[test]
    fn a_watchdog_timeout_of_microseconds_is_pinged_at_the_floor_never_at_zero() {
        for usec in ["1", "2", "3", "19999"] {
            assert_eq!(watchdog_interval(&env(Some(usec), None), 42), Some(MIN_WATCHDOG_INTERVAL), "{usec}");
        }
        assert_eq!(watchdog_interval(&env(Some(&u64::MAX.to_string()), None), 42), Some(Duration::from_micros(u64::MAX / 2)));
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(&NotifyEnv { notify_socket: Some(path.display().to_string()), ..Default::default() });
        n.ready();
        n.status("Ready\nnow");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=Ready now");
    }
}
