//! Running the external tools the volume manager needs (losetup, mkfs.*,
//! resize2fs, xfs_growfs, btrfs): one way, with stdin closed so nothing can
//! prompt, a time bound after which the tool is killed, and errors that quote
//! the whole command line and the tool's stderr.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

/// Why a tool run failed. Each quotes the command line.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ToolError {
    /// cannot run {command}: {source}
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// {command} failed ({status}): {stderr}
    Failed { command: String, status: String, stderr: String },
    /// {command} did not finish within {waited:?} and was killed
    Timeout { command: String, waited: Duration },
}

/// The command line as errors quote it.
pub fn describe<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> String {
    std::iter::once(program.as_os_str()).chain(args.iter().map(AsRef::as_ref)).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// The last lines of a tool's stderr on one line: what a tool says last is
/// its error (Ceph's tools print pages of timestamped noise before it), and a
/// log line or a `/readyz` reason must stay one line.
fn stderr_summary(stderr: &str) -> String {
    const LINES: usize = 3;
    const MAX_CHARS: usize = 1000;
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let kept = lines[lines.len().saturating_sub(LINES)..].join(" | ");
    crate::fsutil::excerpt(&kept, MAX_CHARS)
}

/// Runs `program` with `args`; Ok only on exit status 0.
pub async fn run_tool<S: AsRef<OsStr>>(program: &Path, args: &[S], timeout: Duration) -> Result<Output, ToolError> {
    let out = run_tool_any_exit(program, args, timeout).await?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            command: describe(program, args),
            status: crate::describe::describe_exit(out.status),
            stderr: stderr_summary(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(out)
}

/// Runs `program` with `args` like [`run_tool`], and returns its output
/// whatever its exit status: for tools whose status is an answer (blkid -p
/// exits 2 for "nothing found").
pub async fn run_tool_any_exit<S: AsRef<OsStr>>(program: &Path, args: &[S], timeout: Duration) -> Result<Output, ToolError> {
    let command = describe(program, args);
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ToolError::Spawn { command: command.clone(), source })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.map_err(|source| ToolError::Spawn { command: command.clone(), source })?,
        // Dropping the wait dropped the child, and kill_on_drop killed it.
        Err(_) => return Err(ToolError::Timeout { command, waited: timeout }),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_quote_the_command_and_stderr_and_hangs_are_killed() {
        let err = run_tool(Path::new("/bin/sh"), &["-c", "echo nope >&2; exit 3"], Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(err.to_string(), "/bin/sh -c echo nope >&2; exit 3 failed (exit code 3): nope");
        let err = run_tool(Path::new("/bin/sleep"), &["5"], Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, ToolError::Timeout { .. }), "{err}");
        let err = run_tool(Path::new("/nonexistent/tool"), &["x"], Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().starts_with("cannot run /nonexistent/tool x"), "{err}");
        let err = run_tool(Path::new("/bin/sh"), &["-c", "printf 'a\\nb\\n\\nc\\nd\\n' >&2; exit 1"], Duration::from_secs(10)).await.unwrap_err();
        assert!(err.to_string().ends_with("failed (exit code 1): b | c | d"), "the last lines on one line: {err}");
        let out = run_tool(Path::new("/bin/echo"), &["hi"], Duration::from_secs(10)).await.unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
