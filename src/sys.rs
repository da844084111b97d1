//! The crate's only unsafe code: raw system calls that nix has no safe wrapper
//! for, each behind a safe function whose types make misuse impossible (a
//! borrowed descriptor, a `&mut` to a `#[repr(C)]` struct laid out as the kernel's).
//!
//! Each wrapper is a one-line passthrough: it never retries, logs, chooses
//! arguments or interprets errors. Callers do that, and name the path.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The kernel's `struct fstrim_range` (`<linux/fs.h>`): which bytes of a
/// filesystem FITRIM may discard. On return the kernel has replaced `len` with
/// the number of bytes it trimmed.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FstrimRange {
    /// First byte of the filesystem to consider.
    pub start: u64,
    /// Bytes to consider from `start`; `u64::MAX` for the whole filesystem.
    pub len: u64,
    /// Free extents shorter than this are left alone; 0 lets the filesystem pick.
    pub minlen: u64,
}

/// The generated functions are `unsafe fn`s taking a raw fd and pointer; they
/// stay private to this module behind the safe wrappers below.
mod raw {
    // FITRIM is _IOWR('X', 121, struct fstrim_range).
    nix::ioctl_readwrite!(fitrim, b'X', 121, super::FstrimRange);
    // FICLONE is _IOW(0x94, 9, int): the argument is the source descriptor itself.
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}

/// FITRIM (ioctl_fitrim(2)): discards the unused blocks of the filesystem that
/// holds `fd`, within `range`, and writes the trimmed byte count to `range.len`.
pub fn fitrim(fd: BorrowedFd<'_>, range: &mut FstrimRange) -> nix::Result<()> {
    // SAFETY: `fd` is an open descriptor for the whole call (it is borrowed);
    // `range` is an exclusive, aligned, initialised `FstrimRange`, whose
    // `#[repr(C)]` layout of three u64 is the kernel's `struct fstrim_range`,
    // the size encoded in the request; the kernel reads and writes only those
    // 24 bytes and keeps no pointer to them after returning.
    unsafe { raw::fitrim(fd.as_raw_fd(), range) }.map(drop)
}

/// FICLONE (ioctl_ficlone(2)): makes `dest` share all of `src`'s data
/// copy-on-write (a reflink). Both must be regular files on one filesystem
/// that supports it; `dest` must be open for writing.
pub fn ficlone(dest: BorrowedFd<'_>, src: BorrowedFd<'_>) -> nix::Result<()> {
    let src = nix::sys::ioctl::ioctl_param_type::try_from(src.as_raw_fd()).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: `dest` is open for the whole call (borrowed); the request passes
    // the source descriptor by value, so the kernel reads no memory of ours.
    unsafe { raw::ficlone(dest.as_raw_fd(), src) }.map(drop)
}

/// Makes the child that `command` spawns join the cgroup whose `cgroup.procs`
/// is open as `procs`, between fork and exec: the engine is inside its cgroup
/// before it runs a single instruction, so nothing it forks can escape.
pub fn join_cgroup_before_exec(command: &mut tokio::process::Command, procs: std::fs::File, also: Vec<std::fs::File>) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes write(2)s of a static
    // buffer to descriptors opened by the parent, and allocates nothing
    // (`also` is only iterated). Writing "0" to cgroup.procs moves the writing
    // process (v1 and v2). A failure to join one of `also` is ignored: the
    // parent already warned about the hierarchies it could not prepare.
    unsafe {
        command.pre_exec(move || {
            for other in &also {
                let _ = nix::unistd::write(other, b"0");
            }
            nix::unistd::write(&procs, b"0").map(drop).map_err(std::io::Error::from)
        });
    }
}

/// Registers `fd` with tokio's reactor, for non-blocking reads that wait in
/// epoll (the kernel log). tokio made this `unsafe` because a raw descriptor
/// could be closed and reused behind the reactor's back; an `OwnedFd` moved in
/// cannot be.
pub fn async_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd`: it stays open exactly as long as the
    // registration, and is deregistered before it is closed (AsyncFd's Drop).
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// Opens `name` (one path component) in `dir` with `flags` and `mode`,
/// resolved with `resolve` by openat2(2). Where the kernel has no openat2
/// (before Linux 5.6, or under qemu-user), it falls back to openat(2) with
/// `O_NOFOLLOW` added: for a single component, "beneath its directory and not
/// through a link" is the same promise. A name of several components is then
/// refused (EXDEV) rather than walked unchecked.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    name: &std::path::Path,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
    resolve: nix::fcntl::ResolveFlag,
) -> nix::Result<std::os::fd::OwnedFd> {
    let how = nix::fcntl::OpenHow::new().flags(flags).mode(mode).resolve(resolve);
    let raw = match nix::fcntl::openat2(dir.as_raw_fd(), name, how) {
        Err(nix::errno::Errno::ENOSYS) => {
            let one_component =
                name.components().count() == 1 && !matches!(name.components().next(), Some(std::path::Component::ParentDir | std::path::Component::RootDir));
            if !one_component {
                return Err(nix::errno::Errno::EXDEV);
            }
            nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | nix::fcntl::OFlag::O_NOFOLLOW, mode)?
        }
        other => other?,
    };
    // SAFETY: openat2/openat just returned `raw` as a new descriptor that
    // nothing else in the process knows of, so this OwnedFd is its only owner.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// fsetxattr(2): sets the extended attribute `name` of the open file `fd` to `value`.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: `fd` is open for the whole call (borrowed); `name` is a
    // NUL-terminated string and `value` a readable slice of the given length,
    // both only read by the kernel during the call.
    let rc = unsafe { nix::libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    nix::errno::Errno::result(rc).map(drop)
}

/// fgetxattr(2): the value of the extended attribute `name` of `fd`, at most
/// `buf.len()` bytes of it; returns how many bytes were written to `buf`.
pub fn fgetxattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr, buf: &mut [u8]) -> nix::Result<usize> {
    // SAFETY: `fd` is open for the whole call; `name` is NUL-terminated; the
    // kernel writes at most `buf.len()` bytes into the exclusive `buf`.
    let rc = unsafe { nix::libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    nix::errno::Errno::result(rc).map(|n| usize::try_from(n).unwrap_or(0))
}

/// pidfd_open(2): a descriptor that refers to process `pid` and turns
/// readable when it ends, whoever its parent is (Linux 5.3 and later).
pub fn pidfd_open(pid: i32) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    let raw = i32::try_from(nix::errno::Errno::result(rc)?).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// adjtimex(2) asked only to read (`modes` 0): whether the kernel's clock is
/// synchronized, i.e. a time daemon (chrony, systemd-timesyncd, ntpd) has
/// disciplined it: `STA_UNSYNC` clear and the state not `TIME_ERROR`. This
/// is what systemd-time-wait-sync waits for before `time-sync.target`.
pub fn clock_synchronized() -> nix::Result<bool> {
    // SAFETY: `timex` is a plain C struct of integers, for which all zeroes is
    // a valid value; `modes` = 0 makes adjtimex only read the clock's state.
    let mut tx: nix::libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is an exclusive, initialised `timex` the kernel fills in
    // during the call and keeps no pointer to.
    let state = nix::errno::Errno::result(unsafe { nix::libc::adjtimex(&mut tx) })?;
    Ok(state != nix::libc::TIME_ERROR && tx.status & nix::libc::STA_UNSYNC == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_state_can_be_read_without_privileges_or_changes() {
        // Either answer is right here; what matters is that reading works.
        assert!(clock_synchronized().is_ok());
    }

    #[test]
    fn fstrim_range_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<FstrimRange>(), 24);
        assert_eq!(std::mem::align_of::<FstrimRange>(), 8);
    }

    // The generic _IOC encoding (x86, arm); powerpc, mips and sparc differ.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn fitrim_request_code_is_the_kernels() {
        // FITRIM as <linux/fs.h> defines it on these architectures.
        assert_eq!(nix::request_code_readwrite!(b'X', 121, std::mem::size_of::<FstrimRange>()), 0xC018_5879);
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn ficlone_request_code_is_the_kernels() {
        // FICLONE as <linux/fs.h> defines it: _IOW(0x94, 9, int).
        assert_eq!(nix::request_code_write!(0x94, 9, std::mem::size_of::<nix::libc::c_int>()), 0x4004_9409);
    }

    #[test]
    fn fitrim_on_a_pipe_is_an_error_not_a_crash() {
        let (read, _write) = nix::unistd::pipe().unwrap();
        let mut range = FstrimRange { start: 0, len: u64::MAX, minlen: 0 };
        assert_eq!(fitrim(std::os::fd::AsFd::as_fd(&read), &mut range), Err(nix::errno::Errno::ENOTTY));
        assert_eq!(range.len, u64::MAX);
    }
}
