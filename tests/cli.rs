//! The command line: `check`, `version`, and `run` refusing bad config and task
//! files with exit 2 and a message that names the field.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::path::Path;
use std::process::{Command, Output};
use support::{base_config, write_private, write_task_file};

fn agent_cmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_machine-agent")).args(args).env_remove("MACHINE_AGENT_CONFIG").output().expect("run machine-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_prints_the_version() {
    let out = agent_cmd(&["version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_accepts_a_good_config_and_task() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let out = agent_cmd(&["check", "--config", config.to_str().unwrap(), "--task", task.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// (what is wrong, a config fragment appended to a valid base, the field the message must name)
fn malformed_configs(dir: &Path) -> Vec<(&'static str, String, &'static str)> {
    let loose_token = dir.join("loose-token");
    std::fs::write(&loose_token, "t").unwrap();
    std::fs::set_permissions(&loose_token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let empty_token = dir.join("empty-token");
    write_private(&empty_token, "");
    let not_pem = dir.join("not-pem.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let cp = |extra: &str| format!("[control_plane]\nurl = \"https://cp.example:443\"\n{extra}\n[identity]\nmode = \"aws\"\n");
    vec![
        ("plaintext URL without insecure", "[control_plane]\nurl = \"http://cp.example\"\n[identity]\nmode = \"aws\"\n".into(), "control_plane.url"),
        ("not a URL", "[control_plane]\nurl = \"::::\"\n[identity]\nmode = \"aws\"\n".into(), "control_plane.url"),
        ("CA bundle that is not PEM", cp(&format!("ca_bundle = \"{}\"", not_pem.display())), "control_plane.ca_bundle"),
        ("zero connect timeout", cp("connect_timeout_secs = 0"), "control_plane.connect_timeout_secs"),
        ("backoff start above its cap", cp("backoff_initial_ms = 90000\nbackoff_max_secs = 30"), "control_plane.backoff_initial_ms"),
        ("unknown identity mode", "[control_plane]\nurl = \"https://cp.example\"\n[identity]\nmode = \"gcp\"\n".into(), "identity.mode"),
        ("control plane without identity", "[control_plane]\nurl = \"https://cp.example\"\n".into(), "identity.mode"),
        (
            "token file readable by others",
            format!("[control_plane]\nurl = \"https://cp.example\"\n[identity]\nmode = \"static_token\"\ntoken_file = \"{}\"\n", loose_token.display()),
            "identity.token_file",
        ),
        (
            "empty token file",
            format!("[control_plane]\nurl = \"https://cp.example\"\n[identity]\nmode = \"static_token\"\ntoken_file = \"{}\"\n", empty_token.display()),
            "identity.token_file",
        ),
        ("fly without audience", "[control_plane]\nurl = \"https://cp.example\"\n[identity]\nmode = \"fly\"\n".into(), "identity.fly_oidc_audience"),
        ("unknown field", "[agent2]\nx = 1\n".into(), "agent2"),
        ("bad listen address", "[endpoints]\nlisten = \"localhost\"\n".into(), "endpoints.listen"),
        ("string where a number goes", "[engine]\nstop_grace_secs = \"soon\"\n".into(), "engine.stop_grace_secs"),
        ("relative engine binary", "[engine]\nbinary = \"buildkitd\"\n".into(), "engine.binary"),
        ("TOML syntax error", "[agent\n".into(), "line"),
    ]
}

#[test]
fn malformed_configs_exit_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = malformed_configs(dir.path());
    assert!(cases.len() >= 8);
    for (i, (what, fragment, field)) in cases.into_iter().enumerate() {
        // The base has its own [endpoints]/[engine]; replace rather than duplicate a section.
        let base = base_config(dir.path());
        let text = merge(&base, &fragment);
        let path = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(&path, &text).unwrap();
        for args in [vec!["check", "--config", path.to_str().unwrap()], vec!["run", "--config", path.to_str().unwrap()]] {
            let out = agent_cmd(&args);
            assert_eq!(out.status.code(), Some(2), "{what} ({args:?}): exit 2 expected; stderr:\n{}", stderr(&out));
            assert!(stderr(&out).contains(field), "{what} ({args:?}): message must name {field}; stderr:\n{}", stderr(&out));
        }
    }
}

/// Appends `fragment` to `base`, dropping any section of `base` that `fragment` redefines.
fn merge(base: &str, fragment: &str) -> String {
    let redefined: Vec<&str> = fragment.lines().filter(|l| l.starts_with('[') && l.ends_with(']')).collect();
    let mut out = String::new();
    let mut skipping = false;
    for line in base.lines() {
        if line.starts_with('[') {
            skipping = redefined.contains(&line);
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(fragment);
    out
}

#[test]
fn a_bad_task_file_exits_2_listing_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), Path::new("/etc"));
    let text = std::fs::read_to_string(&task).unwrap();
    let listen = text.lines().find(|l| l.starts_with("listen_address")).unwrap();
    let text = text.replace(listen, "listen_address = \"127.0.0.1:0\"").replace("10737418240", "0");
    std::fs::write(&task, text).unwrap();
    for sub in ["check --task", "run --standalone"] {
        let (cmd, flag) = sub.split_once(' ').unwrap();
        let out = agent_cmd(&[cmd, "--config", config.to_str().unwrap(), flag, task.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", stderr(&out));
        let err = stderr(&out);
        for field in ["buildkit.mounts[0].mount_path", "buildkit.listen_address", "buildkit.cache_size_bytes"] {
            assert!(err.contains(field), "{sub}: {field} missing from:\n{err}");
        }
    }
}

#[test]
fn run_without_a_control_plane_or_a_task_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let out = agent_cmd(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("control_plane"), "{}", stderr(&out));
}
