//! One-line descriptions for logs, errors and reports: an error with all its
//! causes, a gRPC status with its transport cause, how a process ended.

/// A status with its transport cause: "Unavailable: tcp connect error: Connection refused",
/// "Unavailable: ...: invalid peer certificate: UnknownIssuer".
pub fn describe_status(status: &tonic::Status) -> String {
    with_causes(format!("{:?}: {}", status.code(), status.message()), std::error::Error::source(status))
}

/// An error and all its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    with_causes(err.to_string(), err.source())
}

/// Appends each cause not already in the text (wrappers often repeat their source).
fn with_causes(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

/// "exit code 3", "signal 9 (SIGKILL)", "exited cleanly": for logs and errors.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited cleanly".into(),
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => describe_signal(sig),
        (None, None) => "unknown exit".into(),
    }
}

/// "signal 9 (SIGKILL)".
pub fn describe_signal(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(s) => format!("signal {sig} ({s})"),
        Err(_) => format!("signal {sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        assert_eq!(describe_exit(ExitStatus::from_raw(0)), "exited cleanly");
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }
}
