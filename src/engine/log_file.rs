//! The engine's output goes to a file under the state dir, never to a pipe to
//! the agent: a pipe dies with the agent, and Go programs die of SIGPIPE at
//! their next write to a broken stdout or stderr. So an agent that crashes,
//! or is replaced, leaves an engine that keeps logging and serving.
//!
//! The agent tails the file into its own log (target `engine`), from where it
//! was when the tail started. The file is kept under [`MAX_LOG_BYTES`] by
//! copy-and-truncate into `<file>.1`: the engine appends (O_APPEND), so after
//! the truncate its next line lands at the start. A line written between the
//! copy and the truncate is lost from the file (it is usually in the agent's
//! log already); that is the price of never signalling the engine to reopen.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file is rotated once it holds this much.
pub const MAX_LOG_BYTES: u64 = 32 * 1024 * 1024;
/// The tail wakes when the engine writes (an inotify watch on the file), and
/// looks at least this often anyway: a rotation, or no inotify at all.
pub const TAIL_INTERVAL: Duration = Duration::from_secs(2);
/// Writes closer together than this are read in one look: a burst of lines
/// costs one wake-up, not one per line.
const TAIL_BATCH: Duration = Duration::from_millis(20);
/// Longer lines are cut: a runaway log line must not grow the agent's memory.
const MAX_LINE_BYTES: usize = 4096;
/// Read at most this much per look, so a burst is logged in slices.
const READ_CHUNK: usize = 256 * 1024;

/// Opens (creating, 0600) the engine's log for appending: the engine's stdout and stderr.
pub fn open_for_engine(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path)
}

/// Complete lines out of a stream of chunks; a line longer than the bound is
/// cut and the rest of it dropped. Pure.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The current line overflowed: drop bytes until its newline.
    skipping: bool,
}

impl LineSplitter {
    /// Feeds `chunk`; returns the lines it completed, without their newlines.
    pub fn feed(&mut self, chunk: &[u8], max_line: usize) -> Vec<String> {
        let mut lines = vec![];
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            let (body, ends) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            if !self.skipping {
                let room = max_line.saturating_sub(self.partial.len());
                self.partial.extend_from_slice(&body[..body.len().min(room)]);
                self.skipping = body.len() > room;
            }
            if ends {
                lines.push(String::from_utf8_lossy(&self.partial).trim_end().to_string());
                self.partial.clear();
                self.skipping = false;
            }
        }
        lines
    }
}

/// Follows the engine's log into the agent's log until `stop` fires, rotating it when it grows past the bound.
pub async fn tail(path: PathBuf, mut stop: tokio::sync::oneshot::Receiver<()>) {
    use tokio_stream::StreamExt;
    let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut splitter = LineSplitter::default();
    // Polling ten times a second cost more idle CPU than the rest of the agent together.
    let mut writes = watch_writes(&path);
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(TAIL_INTERVAL) => false,
            Some(_) = async { writes.as_mut()?.next().await }, if writes.is_some() => {
                tokio::time::sleep(TAIL_BATCH).await;
                false
            }
            _ = &mut stop => true,
        };
        // One last look on the way out: the engine's last words are the ones that matter.
        match read_new(&path, &mut offset) {
            Ok(bytes) => {
                for line in splitter.feed(&bytes, MAX_LINE_BYTES) {
                    tracing::info!(target: "engine", stream = "log", "{line}");
                }
            }
            Err(error) => tracing::debug!(path = %path.display(), %error, "engine log not readable"),
        }
        if offset >= MAX_LOG_BYTES {
            match rotate(&path) {
                Ok(()) => offset = 0,
                Err(error) => tracing::warn!(path = %path.display(), %error, "cannot rotate the engine log"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// Modifications of the engine's log, as an inotify stream; None without inotify
/// (or before the file exists), and the tail polls at [`TAIL_INTERVAL`] alone.
fn watch_writes(path: &Path) -> Option<inotify::EventStream<[u8; 256]>> {
    use inotify::{Inotify, WatchMask};
    if !path.exists() {
        let _ = open_for_engine(path);
    }
    let inotify = Inotify::init().ok()?;
    inotify.watches().add(path, WatchMask::MODIFY).ok()?;
    inotify.into_event_stream([0u8; 256]).ok()
}

/// The bytes appended since `offset`, at most [`READ_CHUNK`]; a file that
/// shrank (rotated) is read from its start.
fn read_new(path: &Path, offset: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    file.seek(SeekFrom::Start(*offset))?;
    let mut bytes = vec![];
    file.take(READ_CHUNK as u64).read_to_end(&mut bytes)?;
    *offset += bytes.len() as u64;
    Ok(bytes)
}

fn rotate(path: &Path) -> std::io::Result<()> {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_joined_across_chunks_and_cut_at_the_bound() {
        let mut s = LineSplitter::default();
        assert_eq!(s.feed(b"time=1 msg=\"sta", 16), Vec::<String>::new());
        assert_eq!(s.feed(b"rted\"\nshort\nxxxxxxxxxxxxxxxxxxxxxxxx", 16), ["time=1 msg=\"star", "short"]);
        assert_eq!(s.feed(b"xxxx\nnext\n", 16), ["xxxxxxxxxxxxxxxx", "next"]);
        assert_eq!(s.feed(b"\r\n", 16), [""], "a CR before the newline is trimmed");
    }

    #[tokio::test]
    async fn the_tail_starts_at_the_end_reads_what_is_appended_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buildkitd.log");
        std::fs::write(&path, "from before the tail\n").unwrap();
        let mut offset = std::fs::metadata(&path).unwrap().len();
        use std::io::Write;
        let mut engine = open_for_engine(&path).unwrap();
        engine.write_all(b"one\ntwo\n").unwrap();
        assert_eq!(read_new(&path, &mut offset).unwrap(), b"one\ntwo\n");
        rotate(&path).unwrap();
        engine.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(path.with_extension("log.1")).unwrap(), "from before the tail\none\ntwo\n");
        assert_eq!(read_new(&path, &mut offset).unwrap(), b"after\n", "an appending writer lands at the start of the truncated file");
    }
}
