//! A control plane's request to wipe a cache mount ([`pb::CacheReset`]),
//! checked field by field like a task: it is the one message that makes the
//! agent format a device holding data, so every field is untrusted.

use super::{truncate, Problems, TaskError};
use crate::fsutil::{check_clean_absolute, excerpt};
use crate::proto::v1 as pb;
use std::path::{Path, PathBuf};

const MAX_ID_BYTES: usize = 128;
/// A filesystem UUID as blkid prints it: 36 characters for ext4 and xfs and btrfs.
const MAX_UUID_BYTES: usize = 64;

/// A validated cache reset request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheResetRequest {
    pub request_id: String,
    pub task_id: String,
    pub mount_path: PathBuf,
    pub filesystem_uuid: String,
    pub cancel_builds: bool,
}

/// Checks every field; a request that fails names each bad field.
pub fn validate_reset(r: pb::CacheReset) -> Result<CacheResetRequest, TaskError> {
    let mut p = Problems::default();
    for (field, value) in [("reset_cache.request_id", &r.request_id), ("reset_cache.task_id", &r.task_id)] {
        if !is_id(value) {
            p.add(field, format!("expected 1..={MAX_ID_BYTES} characters of [A-Za-z0-9._-], got {:?}", truncate(value)));
        }
    }
    if r.mount_path.len() > 4096 {
        p.add("reset_cache.mount_path", format!("expected a path of at most 4096 bytes, got {}", r.mount_path.len()));
    } else if let Err(problem) = check_clean_absolute(Path::new(&r.mount_path)) {
        p.add("reset_cache.mount_path", excerpt(&problem, 256));
    }
    if !is_uuid(&r.filesystem_uuid) {
        p.add("reset_cache.filesystem_uuid", format!("expected the filesystem's UUID (hex digits and dashes), got {:?}", truncate(&r.filesystem_uuid)));
    }
    if !p.is_empty() {
        return Err(p.into_error());
    }
    Ok(CacheResetRequest {
        request_id: r.request_id,
        task_id: r.task_id,
        mount_path: PathBuf::from(r.mount_path),
        filesystem_uuid: r.filesystem_uuid.to_ascii_lowercase(),
        cancel_builds: r.cancel_builds,
    })
}

fn is_id(s: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn is_uuid(s: &str) -> bool {
    (8..=MAX_UUID_BYTES).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::CacheReset {
        pb::CacheReset {
            request_id: "reset-1".into(),
            task_id: "task-1".into(),
            mount_path: "/var/lib/buildkit".into(),
            filesystem_uuid: "6F1C2A3B-1111-4222-8333-444455556666".into(),
            cancel_builds: false,
        }
    }

    #[test]
    fn a_good_request_is_taken_with_its_uuid_in_lower_case() {
        let r = validate_reset(good()).unwrap();
        assert_eq!(r.filesystem_uuid, "6f1c2a3b-1111-4222-8333-444455556666");
        assert_eq!(r.mount_path, Path::new("/var/lib/buildkit"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let bad = pb::CacheReset {
            request_id: String::new(),
            task_id: "a b".into(),
            mount_path: "/var/../etc".into(),
            filesystem_uuid: "*".into(),
            cancel_builds: true,
        };
        let error = validate_reset(bad).unwrap_err();
        let fields: Vec<&str> = error.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["reset_cache.request_id", "reset_cache.task_id", "reset_cache.mount_path", "reset_cache.filesystem_uuid"]);
    }

    #[test]
    fn an_empty_uuid_is_refused_so_no_request_can_skip_the_guard() {
        let error = validate_reset(pb::CacheReset { filesystem_uuid: String::new(), ..good() }).unwrap_err();
        assert!(error.to_string().contains("reset_cache.filesystem_uuid"), "{error}");
    }
}
