//! The task is untrusted input to a root daemon: a task may name only backing
//! files beneath the configured directories and mount points under the
//! allowed prefixes, each resolved without following links; it never makes
//! the agent grow, format or mount anything else, never mounts over the
//! agent's own directories, and a prepare that fails leaves nothing mounted
//! or attached. Each case runs the real prepare path (or the real agent
//! binary) on loop devices and a scratch root of its own, and compares a
//! snapshot of every host path it could touch before and after.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::config::Config;
use machine_agent::task::{FsType, VolumeMount, VolumeSource};
use machine_agent::volume::manager::{prepare_mount, release_mount, VolumeError, VolumeSettings};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BACKING_BYTES: u64 = 600 << 20;

/// A scratch root of the test's own: `allowed/` is the only backing dir and
/// mount prefix, `outside/` stands in for the rest of the host (`/etc`,
/// `/run`). Whatever a failed case left mounted or attached under it is
/// undone on drop, panic or not.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    allowed: PathBuf,
    outside: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("machine-agent-hostile-").tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (allowed, outside) = (root.join("allowed"), root.join("outside"));
        for d in [&allowed, &outside] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        // A victim: the test's own /etc/passwd.
        std::fs::write(outside.join("passwd"), b"root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::create_dir(outside.join("etc")).unwrap();
        std::fs::write(outside.join("etc/shadow"), b"root:*:19000:0:99999:7:::\n").unwrap();
        Scratch { _dir: dir, root, allowed, outside }
    }

    fn settings(&self) -> VolumeSettings {
        VolumeSettings {
            sys_root: "/".into(),
            device_wait: Duration::from_secs(2),
            unmount_timeout: Duration::from_secs(3),
            kill_holders: false,
            ephemeral_dir: None,
            ext4_bytes_per_inode: None,
            system_paths: machine_agent::volume::manager::default_system_paths(),
            intent_dir: self.root.join("state/volume/format-intents"),
            allowed_backing_dirs: vec![self.allowed.clone()],
            rbd: machine_agent::volume::rbd::RbdSettings {
                mapper: Default::default(),
                owner_id: "hostile-task-test".into(),
                dir: self.allowed.join("rbd"),
                keep_snapshots: 2,
            },
        }
    }

    fn file_mount(&self, backing: &Path, mount_path: &Path) -> VolumeMount {
        VolumeMount {
            mount_path: mount_path.into(),
            source: VolumeSource::File { path: backing.into(), size_bytes: BACKING_BYTES },
            fs_type: FsType::Ext4,
            options: vec![],
            skip_trim: true,
            cache_mode: Default::default(),
        }
    }

    /// Every mount point and every loop device's backing file under the root.
    fn mounted_or_attached(&self) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&self.root))
            .map(|p| format!("mounted at {p}"))
            .collect();
        for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
            if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
                if Path::new(backing.trim()).starts_with(&self.root) {
                    found.push(format!("{} attached to {}", entry.file_name().to_string_lossy(), backing.trim()));
                }
            }
        }
        found
    }

    /// Every host path the case could touch: the scratch root but the agent's
    /// own state dir (format intents are the agent's business).
    fn snapshot(&self) -> Snapshot {
        let state = self.root.join("state");
        snapshot(&self.root).into_iter().filter(|(p, _)| !p.starts_with(&state) && *p != self.root).collect()
    }

    fn assert_nothing_mounted_or_attached(&self) {
        assert_eq!(self.mounted_or_attached(), Vec::<String>::new(), "nothing under the scratch root is left mounted or attached");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        support::cleanup_volumes_under(&self.root);
    }
}

/// One path as the test sees it: type, mode, owner, size, link target, a checksum of its bytes, link count.
type Snapshot = BTreeMap<PathBuf, String>;

/// Every path under `dir` (the directory itself included), never following links.
fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let what = if meta.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
            "dir".to_string()
        } else {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
            format!("file len {} sum {:x}", meta.len(), hasher.finish())
        };
        out.insert(path, format!("{what} mode {:o} uid {} nlink {}", meta.mode(), meta.uid(), meta.nlink()));
    }
    out
}

/// The error chain, for assertions on what it names.
fn text(err: &VolumeError) -> String {
    err.to_string()
}

// === backing files ===

#[tokio::test]
async fn a_backing_file_outside_the_allow_list_is_refused_at_validation_and_never_grown() {
    let s = Scratch::new();
    let victim = s.outside.join("passwd");
    let m = s.file_mount(&victim, &s.allowed.join("cache"));

    // Validation, with the limits the real config builds, refuses it naming the field.
    let config = format!(
        "[volume]\nallowed_mount_prefixes = [\"{a}\"]\nallowed_backing_dirs = [\"{a}\"]\n[agent]\nstate_dir = \"{st}\"\n",
        a = s.allowed.display(),
        st = s.root.join("state").display()
    );
    let limits = Config::parse(&config, &BTreeMap::new()).unwrap().task_limits();
    let mut task = valid_task(&s.allowed.join("cache"), &s.allowed.join("cache.img"));
    task.mounts[0].source = Some(machine_agent::proto::v1::volume_mount::Source::File(machine_agent::proto::v1::FileBackedVolume {
        path: victim.display().to_string(),
        size_bytes: BACKING_BYTES,
    }));
    let err = machine_agent::task::validate_buildkit(task, &limits).unwrap_err();
    assert_eq!(err.0.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), vec!["buildkit.mounts[0].file.path"], "{err}");
    assert!(err.to_string().contains(&s.allowed.display().to_string()), "the error names the allowed dirs: {err}");

    // And the prepare path refuses it on its own, touching nothing.
    let before = s.snapshot();
    let err = prepare_mount(&s.settings(), &m, true).await.unwrap_err();
    assert!(text(&err).contains("allowed_backing_dirs") && text(&err).contains(&victim.display().to_string()), "{err}");
    assert_eq!(s.snapshot(), before, "nothing under the scratch root changed");
    s.assert_nothing_mounted_or_attached();
}

#[tokio::test]
async fn a_symlink_at_any_component_of_the_backing_path_is_refused() {
    let s = Scratch::new();
    // allowed/a/b/cache.img, with each component in turn a link to outside.
    let parts = ["a", "b", "cache.img"];
    for i in 0..parts.len() {
        let case = s.allowed.join(format!("case{i}"));
        let mut real = case.clone();
        for (j, part) in parts.iter().enumerate() {
            if j == i {
                let target = if j + 1 == parts.len() { s.outside.join("passwd") } else { s.outside.join("etc") };
                std::fs::create_dir_all(&real).unwrap();
                std::os::unix::fs::symlink(&target, real.join(part)).unwrap();
                break;
            }
            real.push(part);
        }
        let backing = case.join(parts.join("/"));
        let before = s.snapshot();
        let err = prepare_mount(&s.settings(), &s.file_mount(&backing, &s.allowed.join(format!("m{i}"))), true).await.unwrap_err();
        assert!(text(&err).contains("symbolic link"), "component {i}: {err}");
        assert_eq!(s.snapshot(), before, "component {i}: nothing changed");
        s.assert_nothing_mounted_or_attached();
    }
}

#[tokio::test]
async fn an_existing_backing_file_the_agent_did_not_make_is_neither_grown_nor_formatted() {
    let s = Scratch::new();
    let planted = s.allowed.join("cache.img");
    std::fs::write(&planted, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = s.snapshot();
    let err = prepare_mount(&s.settings(), &s.file_mount(&planted, &s.allowed.join("cache")), true).await.unwrap_err();
    assert!(text(&err).contains("created itself") && text(&err).contains(&planted.display().to_string()), "{err}");
    assert_eq!(s.snapshot(), before, "the planted file is neither grown nor formatted");
    s.assert_nothing_mounted_or_attached();
}

#[tokio::test]
async fn a_hardlinked_backing_file_is_refused() {
    let s = Scratch::new();
    // The agent's own file, prepared and released once...
    let backing = s.allowed.join("cache.img");
    let m = s.file_mount(&backing, &s.allowed.join("cache"));
    let p = prepare_mount(&s.settings(), &m, true).await.unwrap();
    assert!(release_mount(&s.settings(), &p).await.unmounted);
    // ...hardlinked elsewhere: another name could be the system's file.
    std::fs::hard_link(&backing, s.outside.join("alias.img")).unwrap();
    // And a victim hardlinked in under a backing name.
    let victim_link = s.allowed.join("victim.img");
    std::fs::hard_link(s.outside.join("passwd"), &victim_link).unwrap();
    let before = s.snapshot();
    for path in [&backing, &victim_link] {
        let err = prepare_mount(&s.settings(), &s.file_mount(path, &s.allowed.join("cache2")), true).await.unwrap_err();
        assert!(text(&err).contains("hard links"), "{}: {err}", path.display());
    }
    assert_eq!(s.snapshot(), before, "nothing grown, formatted or created");
    s.assert_nothing_mounted_or_attached();
}

// === mount paths ===

#[tokio::test]
async fn a_symlink_at_any_component_of_the_mount_path_is_refused_and_the_prepare_undone() {
    let s = Scratch::new();
    let parts = ["x", "y", "cache"];
    for i in 0..parts.len() {
        let case = s.allowed.join(format!("mnt{i}"));
        let mut real = case.clone();
        std::fs::create_dir_all(&real).unwrap();
        for (j, part) in parts.iter().enumerate() {
            if j == i {
                std::os::unix::fs::symlink(s.outside.join("etc"), real.join(part)).unwrap();
                break;
            }
            real.push(part);
            std::fs::create_dir(&real).unwrap();
        }
        let mount_path = case.join(parts.join("/"));
        let backing = s.allowed.join(format!("b{i}/cache.img"));
        let before = s.snapshot();
        let err = prepare_mount(&s.settings(), &s.file_mount(&backing, &mount_path), true).await.unwrap_err();
        assert!(text(&err).contains("symbolic link"), "component {i}: {err}");
        assert!(matches!(err, VolumeError::RolledBack { .. }), "component {i}: the attach was undone: {err}");
        assert_eq!(s.snapshot(), before, "component {i}: the backing file and its dir are removed again, outside untouched");
        s.assert_nothing_mounted_or_attached();
    }
}

#[tokio::test]
async fn a_prepare_that_fails_after_mounting_leaves_nothing_mounted_or_attached() {
    let s = Scratch::new();
    let mut settings = s.settings();
    // The executor bind is the last step: an "ephemeral dir" that is a file fails it.
    let not_a_dir = s.outside.join("passwd");
    settings.ephemeral_dir = Some(not_a_dir);
    let m = s.file_mount(&s.allowed.join("vol/cache.img"), &s.allowed.join("mnt/cache"));
    let before = s.snapshot();
    let err = prepare_mount(&settings, &m, true).await.unwrap_err();
    let said = text(&err);
    assert!(matches!(err, VolumeError::RolledBack { .. }), "{said}");
    assert!(said.contains("unmounted") && said.contains("detached") && said.contains("removed"), "the error reports each undo: {said}");
    s.assert_nothing_mounted_or_attached();
    assert_eq!(s.snapshot(), before, "the mount dirs, the backing file and its dir are gone again");
}

#[test]
fn a_mount_path_equal_to_inside_or_containing_the_state_dir_is_refused() {
    let s = Scratch::new();
    let state = s.allowed.join("state");
    let socket_dir = s.allowed.join("run");
    let config = s.root.join("config.toml");
    let base = support::base_config(&s.root)
        .replace(
            &format!("allowed_mount_prefixes = [\"{}\"]", s.root.join("mnt").display()),
            &format!("allowed_mount_prefixes = [\"{}\"]", s.allowed.display()),
        )
        .replace(&format!("state_dir = \"{}\"", s.root.join("state").display()), &format!("state_dir = \"{}\"", state.display()))
        .replace(&support::engine_socket(&s.root).display().to_string(), &socket_dir.join("bk.sock").display().to_string());
    std::fs::write(&config, &base).unwrap();
    let task = support::write_task_file(&s.root, &s.allowed);
    let text = std::fs::read_to_string(&task).unwrap();
    let wanted = format!("mount_path = \"{}/cache\"", s.allowed.display());
    assert!(text.contains(&wanted), "{text}");
    let before = snapshot(&s.allowed);
    for (what, mount_path) in [
        ("equal to the state dir", state.clone()),
        ("inside the state dir", state.join("engine")),
        ("containing the state dir", s.allowed.clone()),
        ("inside the socket dir", socket_dir.join("x")),
    ] {
        std::fs::write(&task, text.replace(&wanted, &format!("mount_path = \"{}\"", mount_path.display()))).unwrap();
        for sub in [["check", "--task"], ["run", "--standalone"]] {
            let out = Command::new(env!("CARGO_BIN_EXE_machine-agent"))
                .args([sub[0], "--config", config.to_str().unwrap(), sub[1], task.to_str().unwrap()])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} ({}): {err}", sub[0]);
            assert!(err.contains("mounts[0].mount_path"), "{what}: the error names the field: {err}");
        }
    }
    assert_eq!(snapshot(&s.allowed), before, "nothing was created or mounted");
    s.assert_nothing_mounted_or_attached();
}

// === the state dir's files ===

#[test]
fn a_symlink_planted_at_the_old_temp_name_does_not_redirect_a_key_write() {
    let s = Scratch::new();
    let key = s.allowed.join("key.pem");
    // write_atomic used `.<name>.tmp-<pid>`: guessable by anyone who knows the agent's pid.
    let planted = s.allowed.join(format!(".key.pem.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(s.outside.join("passwd"), &planted).unwrap();
    let outside_before = snapshot(&s.outside);
    machine_agent::fsutil::write_atomic(&key, b"PRIVATE KEY", 0o600).unwrap();
    assert_eq!(snapshot(&s.outside), outside_before, "the link's target is untouched");
    assert_eq!(std::fs::read(&key).unwrap(), b"PRIVATE KEY");
    assert!(!std::fs::symlink_metadata(&key).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
}

// === helpers ===

/// A task the validator accepts, with one file-backed mount.
fn valid_task(mount_path: &Path, backing: &Path) -> machine_agent::proto::v1::BuildkitTask {
    use machine_agent::proto::v1 as pb;
    let pki = support::TestPki::new("hostile ca");
    pb::BuildkitTask {
        task_id: "hostile-1".into(),
        tls: Some(pb::TlsMaterial { cert_pem: pki.server_cert_pem.clone(), key_pem: pki.server_key_pem.clone(), ca_pem: pki.ca_pem.clone() }),
        mounts: vec![pb::VolumeMount {
            mount_path: mount_path.display().to_string(),
            source: Some(pb::volume_mount::Source::File(pb::FileBackedVolume { path: backing.display().to_string(), size_bytes: BACKING_BYTES })),
            fs_type: pb::FilesystemType::Ext4 as i32,
            options: vec![],
            skip_trim: true,
            cache_mode: 0,
        }],
        cache_size_bytes: 10 << 30,
        listen_address: "127.0.0.1:1234".into(),
        ..Default::default()
    }
}

// === hostile path shapes, against the pure validator and the resolver ===

mod shapes {
    use super::*;
    use machine_agent::task::{paths_overlap, validate_buildkit, TaskLimits};
    use machine_agent::volume::backing::allowed_root;
    use machine_agent::volume::nofollow::{clean_components, open_dir, WalkError};
    use proptest::prelude::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    const ALLOWED: &str = "/srv/ma/allowed";
    const STATE: &str = "/srv/ma/allowed/state";
    const SOCKET_DIR: &str = "/run/machine-agent";

    fn limits() -> TaskLimits {
        TaskLimits {
            allowed_mount_prefixes: vec![ALLOWED.into()],
            allowed_backing_dirs: vec![ALLOWED.into()],
            reserved_paths: vec![STATE.into(), SOCKET_DIR.into()],
            allowed_engine_env: Default::default(),
            trace_endpoints: Default::default(),
        }
    }

    /// Path text from segments a hostile task would try: `..` and `.` after a
    /// clean prefix, empty segments (`//`), NUL, the state and socket dirs,
    /// names that share a prefix with an allowed dir.
    fn hostile_path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just("srv".to_string()),
            Just("ma".to_string()),
            Just("allowed".to_string()),
            Just("allowedx".to_string()),
            Just("state".to_string()),
            Just("run".to_string()),
            Just("machine-agent".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just(String::new()),
            Just("a\0b".to_string()),
            Just("etc".to_string()),
            Just("cache.img".to_string()),
            "[a-z]{1,4}",
        ];
        (any::<bool>(), proptest::collection::vec(segment, 0..8))
            .prop_map(|(absolute, parts)| format!("{}{}", if absolute { "/" } else { "" }, parts.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn an_accepted_task_names_only_clean_paths_beneath_the_allowed_dirs_and_clear_of_the_agents_own(
            mount_path in hostile_path(), backing in hostile_path(),
        ) {
            let mut task = valid_task(Path::new(ALLOWED).join("cache").as_path(), Path::new(ALLOWED).join("cache.img").as_path());
            task.mounts[0].mount_path = mount_path.clone();
            task.mounts[0].source = Some(machine_agent::proto::v1::volume_mount::Source::File(machine_agent::proto::v1::FileBackedVolume { path: backing.clone(), size_bytes: BACKING_BYTES }));
            if let Ok(accepted) = validate_buildkit(task, &limits()) {
                let m = &accepted.mounts[0];
                prop_assert!(clean_components(&m.mount_path).is_ok(), "{mount_path:?}");
                prop_assert!(m.mount_path.starts_with(ALLOWED), "{mount_path:?}");
                for reserved in &limits().reserved_paths {
                    prop_assert!(!paths_overlap(&m.mount_path, reserved), "{mount_path:?} overlaps {}", reserved.display());
                }
                let VolumeSource::File { path, .. } = &m.source else { unreachable!() };
                prop_assert!(clean_components(path).is_ok(), "{backing:?}");
                prop_assert!(allowed_root(path, &limits().allowed_backing_dirs).is_some(), "{backing:?}");
                prop_assert!(!path.starts_with(&m.mount_path), "{backing:?} inside {mount_path:?}");
            }
        }

        #[test]
        fn the_resolver_takes_only_clean_absolute_paths_and_any_bytes_as_names(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..6),
        ) {
            let mut bytes = vec![];
            for p in &parts {
                bytes.push(b'/');
                bytes.extend_from_slice(p);
            }
            let path = Path::new(OsStr::from_bytes(&bytes));
            let hostile = bytes.is_empty()
                || bytes.contains(&0)
                || bytes.windows(2).any(|w| w == b"//")
                || parts.iter().any(|p| p.as_slice() == b"." || p.as_slice() == b"..")
                || parts.iter().any(|p| p.contains(&b'/'));
            match clean_components(path) {
                Ok(components) => {
                    prop_assert!(!hostile || parts.iter().any(|p| p.contains(&b'/')), "{path:?} accepted");
                    let rejoined: PathBuf = std::iter::once(OsStr::new("/")).chain(components.iter().copied()).collect();
                    prop_assert_eq!(rejoined.as_path(), path);
                }
                Err(_) => prop_assert!(hostile, "{path:?} refused"),
            }
            // Allowed means strictly beneath, by components.
            if let Some(root) = allowed_root(path, &[PathBuf::from("/a")]) {
                prop_assert!(path.starts_with(root) && path != root);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// A real tree with a link at random components: opening (and
        /// creating) the path either refuses naming a link, or opens exactly
        /// the directory the path names; nothing is ever made outside.
        #[test]
        fn the_resolver_never_goes_through_a_link(links in proptest::collection::vec(any::<bool>(), 1..5)) {
            let s = Scratch::new();
            let mut real = s.allowed.clone();
            let mut expect_link = false;
            for (i, is_link) in links.iter().enumerate() {
                let next = real.join(format!("c{i}"));
                if *is_link && !expect_link {
                    std::fs::create_dir_all(&real).unwrap();
                    std::os::unix::fs::symlink(&s.outside, &next).unwrap();
                    expect_link = true;
                } else if !expect_link && i % 2 == 0 {
                    // Fails when the parent is missing: the walk creates both then.
                    let _ = std::fs::create_dir(&next);
                }
                real = next;
            }
            let before = snapshot(&s.outside);
            match open_dir(&real, Some(nix::sys::stat::Mode::S_IRWXU)) {
                Ok(opened) => {
                    prop_assert!(!expect_link);
                    let at = std::fs::read_link(opened.proc_path()).unwrap();
                    prop_assert_eq!(at, real.clone());
                }
                Err(WalkError::Symlink { component, .. }) => {
                    prop_assert!(expect_link);
                    prop_assert!(std::fs::symlink_metadata(&component).unwrap().file_type().is_symlink());
                }
                Err(other) => prop_assert!(false, "{other}"),
            }
            prop_assert_eq!(snapshot(&s.outside), before);
        }
    }
}
