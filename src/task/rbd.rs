//! Validation of a task's Ceph RBD volume: every field is untrusted input that
//! ends up on an `rbd` command line, in a keyring or in a ceph.conf the agent
//! writes, so each is checked against Ceph's own rules before anything is written.

use super::{Problems, RbdImage};
use crate::proto::v1 as pb;
use crate::secret::Secret;

/// Checks an RBD volume; None when a problem was recorded.
pub(super) fn validate_rbd(p: &mut Problems, field: &str, r: pb::RbdVolume) -> Option<RbdImage> {
    let errors_before = p.total();
    let client_id = match r.client_name.strip_prefix("client.") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            p.add(format!("{field}.client_name"), "expected client.<id>");
            String::new()
        }
    };
    if r.monitors.is_empty() {
        p.add(format!("{field}.monitors"), "expected at least one monitor address");
    }
    (p.total() == errors_before).then(|| RbdImage {
        pool: r.pool,
        namespace: (!r.namespace.is_empty()).then_some(r.namespace),
        image: r.image,
        client_id,
        key: Secret::new(r.key),
        monitors: r.monitors,
        conf: vec![],
        create_size_bytes: (r.size_bytes > 0).then_some(r.size_bytes),
        take_over_from: (!r.take_over_from.is_empty()).then_some(r.take_over_from),
    })
}
