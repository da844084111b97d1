//! The command lines of the Ceph tools, built from an image and the
//! credentials the agent wrote for it. Pure: [`super`] runs them.
//!
//! Every run names the agent's own conf (`-c`, which names the keyring and the
//! client timeouts) and the client (`--id`): nothing under /etc/ceph is read.

use super::super::format::CommandLine;
use super::lock::LOCK_NAME;
use crate::task::RbdImage;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const RBD: &str = "/usr/bin/rbd";
pub const CEPH: &str = "/usr/bin/ceph";
pub const RBD_FUSE: &str = "/usr/bin/rbd-fuse";
pub const RADOS: &str = "/usr/bin/rados";

/// How the tools reach the cluster as the task's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephClient {
    pub conf: PathBuf,
    pub client_id: String,
}

/// The kernel's device types for `rbd device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    Krbd,
    Nbd,
}

impl DeviceType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Krbd => "krbd",
            Self::Nbd => "nbd",
        }
    }
}

impl CephClient {
    fn line(&self, program: &str, args: &[&str]) -> CommandLine {
        let mut all: Vec<OsString> = vec!["-c".into(), self.conf.clone().into(), "--id".into(), self.client_id.clone().into()];
        all.extend(args.iter().map(OsString::from));
        CommandLine { program: program.into(), args: all }
    }

    pub fn info(&self, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["info", "--format", "json", &image.spec()])
    }

    /// A new image of `size_bytes` (rounded up to whole MiB, rbd's unit), with
    /// the exclusive-lock feature every writer's client then takes part in.
    pub fn create(&self, image: &RbdImage, size_bytes: u64) -> CommandLine {
        let mib = size_bytes.div_ceil(1 << 20);
        self.line(RBD, &["create", "--size", &format!("{mib}M"), "--image-feature", "layering,exclusive-lock", &image.spec()])
    }

    /// `rados` on the image's pool and namespace.
    fn rados(&self, image: &RbdImage, args: &[&str]) -> CommandLine {
        let mut all = vec!["-p", image.pool.as_str()];
        if let Some(ns) = &image.namespace {
            all.extend(["--namespace", ns.as_str()]);
        }
        all.extend(args);
        self.line(RADOS, &all)
    }

    /// The holders of the owner lock on the image's header object (see [`super::lock`]).
    pub fn lock_info(&self, image: &RbdImage, header: &str) -> CommandLine {
        self.rados(image, &["--format", "json", "lock", "info", header, LOCK_NAME])
    }

    /// Takes the owner lock: fails (EBUSY) while anyone holds it, the same owner included.
    pub fn lock_get(&self, image: &RbdImage, header: &str, owner_id: &str) -> CommandLine {
        let description = format!("machine-agent owner {owner_id}");
        self.rados(
            image,
            &[
                "lock",
                "get",
                header,
                LOCK_NAME,
                "--lock-type",
                "exclusive",
                "--lock-cookie",
                owner_id,
                "--lock-tag",
                owner_id,
                "--lock-description",
                &description,
            ],
        )
    }

    pub fn lock_break(&self, image: &RbdImage, header: &str, locker: &str, owner_id: &str) -> CommandLine {
        self.rados(image, &["lock", "break", header, LOCK_NAME, locker, "--lock-cookie", owner_id])
    }

    pub fn status(&self, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["status", "--format", "json", &image.spec()])
    }

    /// Fences a client: the OSDs refuse everything it sends from now on.
    pub fn blocklist(&self, address: &str) -> CommandLine {
        self.line(CEPH, &["osd", "blocklist", "add", address])
    }

    /// `exclusive`: the kernel client takes the image's lock and never hands
    /// it to another writer (no automatic lock transitions).
    pub fn device_map(&self, kind: DeviceType, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["device", "map", "--device-type", kind.as_str(), "--options", "exclusive", &image.spec()])
    }

    pub fn device_list(&self, kind: DeviceType) -> CommandLine {
        self.line(RBD, &["device", "list", "--device-type", kind.as_str(), "--format", "json"])
    }

    pub fn device_unmap(&self, kind: DeviceType, device: &Path) -> CommandLine {
        self.line(RBD, &["device", "unmap", "--device-type", kind.as_str(), &device.to_string_lossy()])
    }

    /// `pool/image@snapshot`, how `rbd` names a snapshot.
    fn snap_spec(image: &RbdImage, snapshot: &str) -> String {
        format!("{}@{snapshot}", image.spec())
    }

    pub fn snap_list(&self, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["snap", "ls", "--format", "json", &image.spec()])
    }

    pub fn snap_create(&self, image: &RbdImage, snapshot: &str) -> CommandLine {
        self.line(RBD, &["snap", "create", &Self::snap_spec(image, snapshot)])
    }

    /// A protected snapshot cannot be removed, and clone format 1 clones only a protected one.
    pub fn snap_protect(&self, image: &RbdImage, snapshot: &str) -> CommandLine {
        self.line(RBD, &["snap", "protect", &Self::snap_spec(image, snapshot)])
    }

    /// Fails (EBUSY) while a clone of the snapshot exists.
    pub fn snap_unprotect(&self, image: &RbdImage, snapshot: &str) -> CommandLine {
        self.line(RBD, &["snap", "unprotect", &Self::snap_spec(image, snapshot)])
    }

    pub fn snap_remove(&self, image: &RbdImage, snapshot: &str) -> CommandLine {
        self.line(RBD, &["snap", "rm", &Self::snap_spec(image, snapshot)])
    }

    /// The images cloned from a snapshot.
    pub fn children(&self, image: &RbdImage, snapshot: &str) -> CommandLine {
        self.line(RBD, &["children", "--format", "json", &Self::snap_spec(image, snapshot)])
    }

    /// A copy-on-write clone of `parent@snapshot` named `child`, with the
    /// features an image the agent creates has. The clone format is left to
    /// `rbd_default_clone_format` (auto: format 2 only when the cluster
    /// requires mimic clients, else format 1, which needs the snapshot
    /// protected; the agent always protects its commits, so both work).
    pub fn clone_image(&self, parent: &RbdImage, snapshot: &str, child: &RbdImage) -> CommandLine {
        self.line(RBD, &["clone", "--image-feature", "layering,exclusive-lock", &Self::snap_spec(parent, snapshot), &child.spec()])
    }

    /// The image's metadata as a JSON object (rbd prints nothing when there is none).
    pub fn meta_list(&self, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["image-meta", "list", "--format", "json", &image.spec()])
    }

    pub fn meta_set(&self, image: &RbdImage, key: &str, value: &str) -> CommandLine {
        self.line(RBD, &["image-meta", "set", &image.spec(), key, value])
    }

    /// Removes the image and its data; refused (EBUSY) while a client still watches it.
    pub fn remove(&self, image: &RbdImage) -> CommandLine {
        self.line(RBD, &["rm", "--no-progress", &image.spec()])
    }

    /// rbd-fuse shows the image as a file named after it under `mount_point`.
    pub fn fuse(&self, image: &RbdImage, mount_point: &Path) -> CommandLine {
        self.line(RBD_FUSE, &["-p", &image.pool, "-r", &image.image, &mount_point.to_string_lossy()])
    }
}

/// `line` run in a transient systemd scope `unit` of its own (systemd-run
/// execs it in place): what it leaves running (rbd-fuse's daemon) is then
/// outside the agent's unit, and neither `KillMode=` nor a restart or handoff
/// of machine-agent.service ends it. The scope goes once its last process does.
pub fn in_scope(line: CommandLine, systemd_run: &Path, unit: &str) -> CommandLine {
    let mut args: Vec<OsString> =
        ["--scope", "--quiet", "--collect", &format!("--unit={unit}"), "--slice=system.slice", "--"].iter().map(OsString::from).collect();
    args.push(line.program.into_os_string());
    args.extend(line.args);
    CommandLine { program: systemd_run.into(), args }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn image(namespace: Option<&str>) -> RbdImage {
        RbdImage {
            pool: "cache".into(),
            namespace: namespace.map(Into::into),
            image: "project-amd64".into(),
            client_id: "builder".into(),
            key: Secret::new("AQ"),
            monitors: vec!["127.0.0.1:6789".into()],
            conf: vec![],
            create_size_bytes: None,
            take_over_from: None,
        }
    }

    fn text(c: &CommandLine) -> String {
        std::iter::once(c.program.to_string_lossy().into_owned()).chain(c.args.iter().map(|a| a.to_string_lossy().into_owned())).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn every_line_names_the_agents_conf_and_client() {
        let client = CephClient { conf: "/var/lib/machine-agent/rbd/x/ceph.conf".into(), client_id: "builder".into() };
        assert_eq!(
            text(&client.info(&image(None))),
            "/usr/bin/rbd -c /var/lib/machine-agent/rbd/x/ceph.conf --id builder info --format json cache/project-amd64"
        );
        assert_eq!(
            text(&client.lock_get(&image(Some("team")), "rbd_header.1f2e", "m1")),
            "/usr/bin/rados -c /var/lib/machine-agent/rbd/x/ceph.conf --id builder -p cache --namespace team lock get rbd_header.1f2e machine-agent \
             --lock-type exclusive --lock-cookie m1 --lock-tag m1 --lock-description machine-agent owner m1"
        );
        assert!(text(&client.blocklist("127.0.0.1:0/77")).ends_with("--id builder osd blocklist add 127.0.0.1:0/77"));
    }

    #[test]
    fn krbd_and_nbd_maps_are_exclusive_and_sizes_round_up_to_mib() {
        let client = CephClient { conf: "/c".into(), client_id: "b".into() };
        assert_eq!(
            text(&client.device_map(DeviceType::Krbd, &image(None))),
            "/usr/bin/rbd -c /c --id b device map --device-type krbd --options exclusive cache/project-amd64"
        );
        assert!(text(&client.device_map(DeviceType::Nbd, &image(None))).contains("--device-type nbd --options exclusive"));
        assert!(text(&client.create(&image(None), (1 << 30) + 1)).contains("--size 1025M --image-feature layering,exclusive-lock"));
        assert_eq!(text(&client.fuse(&image(None), Path::new("/m"))), "/usr/bin/rbd-fuse -c /c --id b -p cache -r project-amd64 /m");
        assert_eq!(
            text(&in_scope(client.fuse(&image(None), Path::new("/m")), Path::new("/usr/bin/systemd-run"), "f.scope")),
            "/usr/bin/systemd-run --scope --quiet --collect --unit=f.scope --slice=system.slice -- /usr/bin/rbd-fuse -c /c --id b -p cache -r project-amd64 /m"
        );
    }

    #[test]
    fn snapshot_clone_and_metadata_lines_name_the_image_and_snapshot() {
        let client = CephClient { conf: "/c".into(), client_id: "b".into() };
        let (primary, mut clone) = (image(None), image(None));
        clone.image = "project-amd64.clone.0123456789ab".into();
        assert_eq!(text(&client.snap_create(&primary, "machine-agent.t.1")), "/usr/bin/rbd -c /c --id b snap create cache/project-amd64@machine-agent.t.1");
        assert!(text(&client.snap_protect(&primary, "s")).ends_with("snap protect cache/project-amd64@s"));
        assert!(text(&client.children(&primary, "s")).ends_with("children --format json cache/project-amd64@s"));
        assert!(text(&client.clone_image(&primary, "s", &clone))
            .ends_with("clone --image-feature layering,exclusive-lock cache/project-amd64@s cache/project-amd64.clone.0123456789ab"));
        assert!(text(&client.meta_set(&clone, "machine-agent.disposable", "m1"))
            .ends_with("image-meta set cache/project-amd64.clone.0123456789ab machine-agent.disposable m1"));
        assert!(text(&client.remove(&image(Some("team")))).ends_with("rm --no-progress cache/team/project-amd64"));
    }
}
