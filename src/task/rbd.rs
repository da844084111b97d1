//! Validation of a task's Ceph RBD volume: every field is untrusted input that
//! ends up on an `rbd` command line, in a keyring or in a ceph.conf the agent
//! writes, so each is checked against Ceph's own rules before anything is written.
//!
//! The parsers here (names, the key, monitor addresses, the ceph.conf body)
//! are pure; nothing in this module reads or writes a file. No problem ever
//! quotes the key, and other text is quoted only through `truncate`.

use super::{truncate, Problems, RbdImage, MAX_VOLUME_BYTES, MIN_VOLUME_BYTES};
use crate::proto::v1 as pb;
use crate::secret::Secret;
use base64::Engine as _;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Pool, namespace and image names: Ceph stores longer ones, but 128 bytes
/// holds any generated name (a prefix and a UUID is 40) and keeps the whole
/// `pool/namespace/image` spec short on every command line and in sysfs.
pub const MAX_RBD_NAME_BYTES: usize = 128;
/// The `<id>` of `client.<id>`: cephx ids are short handles, and the id is
/// also a keyring section and part of admin-socket and log file names.
pub const MAX_CLIENT_ID_BYTES: usize = 64;
/// Ceph's encoded CryptoKey: u16 type, u32 seconds, u32 nanoseconds, u16
/// length, then the 16-byte AES secret.
const ENCODED_KEY_BYTES: usize = 2 + 4 + 4 + 2 + AES_SECRET_BYTES;
/// 28 bytes in padded base64.
pub const KEY_BASE64_CHARS: usize = 40;
const CEPH_CRYPTO_AES: u16 = 1;
const AES_SECRET_BYTES: usize = 16;
/// A cluster has 3 or 5 monitors; 16 leaves room and bounds the work.
pub const MAX_MONITORS: usize = 16;
/// A bracketed address vector holds a v2 and a v1 address; 4 leaves room.
const MAX_ADDRS_PER_MONITOR: usize = 4;
/// `[v2:[IPv6]:3300/nonce,v1:[IPv6]:6789/nonce]` is about 110 bytes; a DNS name 253.
const MAX_MONITOR_BYTES: usize = 512;
/// A client's ceph.conf is a few lines; a larger body is refused unparsed.
pub const MAX_CEPH_CONF_BYTES: usize = 16 * 1024;
/// Longer than any Ceph option name.
const MAX_CONF_KEY_BYTES: usize = 64;
/// Room for a mon_host of [`MAX_MONITORS`] address vectors.
const MAX_CONF_VALUE_BYTES: usize = 2048;
/// Owner ids tag image locks: a machine-id (32 hex digits) or an operator's name.
pub const MAX_OWNER_ID_BYTES: usize = 128;

/// Client settings a task's ceph.conf may carry: none names a file, a
/// directory, a plugin or a command, so the agent's own keyring, admin socket
/// and log locations (and nothing else on the host) are what the tools use.
/// `mon_host` is allowed too, and handled apart (it becomes the monitors).
pub const ALLOWED_CONF_KEYS: &[&str] = &[
    "fsid",
    "mon_dns_srv_name",
    "ms_mode",
    "ms_client_mode",
    "ms_mon_client_mode",
    "ms_bind_ipv6",
    "ms_bind_ipv4",
    "auth_client_required",
    "auth_cluster_required",
    "auth_service_required",
    "rbd_cache",
    "rbd_cache_size",
    "rbd_cache_max_dirty",
    "rbd_cache_target_dirty",
    "rbd_cache_writethrough_until_flush",
    "rbd_default_features",
    "client_mount_timeout",
    "rados_mon_op_timeout",
    "rados_osd_op_timeout",
    "mon_client_hunt_interval",
];

/// Checks an RBD volume; None when a problem was recorded.
pub(super) fn validate_rbd(p: &mut Problems, field: &str, r: pb::RbdVolume) -> Option<RbdImage> {
    let errors_before = p.total();
    let name = |p: &mut Problems, which: &str, value: &str| {
        if let Err(problem) = check_rbd_name(value, MAX_RBD_NAME_BYTES) {
            p.add(format!("{field}.{which}"), problem);
        }
    };
    name(p, "pool", &r.pool);
    if !r.namespace.is_empty() {
        name(p, "namespace", &r.namespace);
    }
    name(p, "image", &r.image);

    let client_id = match r.client_name.strip_prefix("client.").map(|id| (id, check_rbd_name(id, MAX_CLIENT_ID_BYTES))) {
        Some((id, Ok(()))) => id.to_string(),
        Some((_, Err(problem))) => {
            p.add(format!("{field}.client_name"), format!("expected client.<id>: {problem}"));
            String::new()
        }
        None => {
            p.add(format!("{field}.client_name"), format!("expected client.<id>, got {:?}", truncate(&r.client_name)));
            String::new()
        }
    };

    if let Err(problem) = check_key(&r.key) {
        p.add(format!("{field}.key"), problem);
    }

    let from_task = check_monitor_list(p, &format!("{field}.monitors"), &r.monitors);
    let (conf_monitors, conf) =
        if r.ceph_conf.is_empty() { (None, vec![]) } else { check_ceph_conf(p, &format!("{field}.ceph_conf"), &r.ceph_conf, &client_id) };
    // One source of truth: a monitor list in two places could disagree.
    let monitors = match (r.monitors.is_empty(), conf_monitors) {
        (false, Some(_)) => {
            p.add(format!("{field}.monitors"), "given both here and as mon_host in ceph_conf; give one");
            vec![]
        }
        (false, None) => from_task,
        (true, Some(from_conf)) => from_conf,
        (true, None) => {
            p.add(format!("{field}.monitors"), "expected at least one monitor address, here or as mon_host in ceph_conf");
            vec![]
        }
    };

    if r.size_bytes != 0 && !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&r.size_bytes) {
        p.add(format!("{field}.size_bytes"), format!("expected 0 (never create) or {MIN_VOLUME_BYTES}..={MAX_VOLUME_BYTES}, got {}", r.size_bytes));
    }
    if !r.take_over_from.is_empty() && !is_owner_id(&r.take_over_from) {
        p.add(format!("{field}.take_over_from"), format!("expected an owner id: {OWNER_ID_RULE}, got {:?}", truncate(&r.take_over_from)));
    }

    (p.total() == errors_before).then(|| RbdImage {
        pool: r.pool,
        namespace: (!r.namespace.is_empty()).then_some(r.namespace),
        image: r.image,
        client_id,
        key: Secret::new(r.key),
        monitors,
        conf,
        create_size_bytes: (r.size_bytes > 0).then_some(r.size_bytes),
        take_over_from: (!r.take_over_from.is_empty()).then_some(r.take_over_from),
    })
}

// === names ===

/// A pool, namespace or image name, or a client id: Ceph's rules (no `/` or
/// `@`, which split an image spec and a snapshot) narrowed to what is safe
/// as one command-line argument and one path component. Pure.
pub fn check_rbd_name(name: &str, max_bytes: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max_bytes {
        return Err(format!("expected 1..={max_bytes} bytes, got {}", name.len()));
    }
    if name.starts_with(['-', '.']) {
        // A leading dash reads as an option; a leading dot as a hidden or relative name.
        return Err(format!("must not start with '-' or '.', got {:?}", truncate(name)));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(format!("expected only [A-Za-z0-9._-], got {:?}", truncate(name)));
    }
    Ok(())
}

const OWNER_ID_RULE: &str = "1..=128 bytes of [A-Za-z0-9._:-]";

/// An owner id (`volume.owner_id`, `take_over_from`): it tags a lock and is
/// passed to `rbd lock`, so it is kept to a plain token. Pure.
pub fn is_owner_id(id: &str) -> bool {
    (1..=MAX_OWNER_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

// === the key ===

/// A cephx key as a keyring holds it: padded standard base64 of Ceph's
/// encoded CryptoKey (type 1 = AES, a creation time, length 16, the secret).
/// The problem never quotes the key. Pure.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.len() != KEY_BASE64_CHARS {
        return Err(format!("expected a cephx key of {KEY_BASE64_CHARS} base64 characters, got {} characters", key.len()));
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(key).map_err(|_| "expected a cephx key in padded standard base64".to_string())?;
    let [t0, t1, _, _, _, _, _, _, _, _, l0, l1, ..] = bytes[..] else {
        return Err(format!("expected {ENCODED_KEY_BYTES} bytes of encoded key, got {}", bytes.len()));
    };
    if bytes.len() != ENCODED_KEY_BYTES {
        return Err(format!("expected {ENCODED_KEY_BYTES} bytes of encoded key, got {}", bytes.len()));
    }
    if u16::from_le_bytes([t0, t1]) != CEPH_CRYPTO_AES {
        return Err("expected a key of type 1 (AES)".into());
    }
    if usize::from(u16::from_le_bytes([l0, l1])) != AES_SECRET_BYTES {
        return Err(format!("expected a {AES_SECRET_BYTES}-byte secret"));
    }
    Ok(())
}

// === monitors ===

/// The task's `monitors`: 1..=[`MAX_MONITORS`], each one monitor. Returns
/// them when every one is good.
fn check_monitor_list(p: &mut Problems, field: &str, monitors: &[String]) -> Vec<String> {
    if monitors.len() > MAX_MONITORS {
        p.add(field, format!("expected at most {MAX_MONITORS} monitors, got {}; none was checked", monitors.len()));
        return vec![];
    }
    let before = p.total();
    for (i, m) in monitors.iter().enumerate() {
        if let Err(problem) = parse_monitor(m) {
            p.add(format!("{field}[{i}]"), problem);
        }
    }
    if p.total() == before {
        monitors.to_vec()
    } else {
        vec![]
    }
}

/// One monitor: `host:port` (optionally `v1:`/`v2:` first and `/<nonce>`
/// after) or a bracketed address vector `[v2:host:port,v1:host:port]`. A host
/// is IPv4, `[IPv6]` or an RFC 1123 DNS name. Pure.
pub fn parse_monitor(m: &str) -> Result<(), String> {
    if m.is_empty() || m.len() > MAX_MONITOR_BYTES {
        return Err(format!("expected a monitor address of 1..={MAX_MONITOR_BYTES} bytes, got {}", m.len()));
    }
    let quoted = || truncate(m);
    let vector = m.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).filter(|inner| inner.starts_with("v1:") || inner.starts_with("v2:"));
    let result = match vector {
        Some(inner) => {
            let addrs: Vec<&str> = inner.split(',').collect();
            if addrs.len() > MAX_ADDRS_PER_MONITOR {
                Err(format!("expected at most {MAX_ADDRS_PER_MONITOR} addresses in a vector"))
            } else {
                // Inside a vector each address says its protocol, as Ceph prints them.
                addrs.iter().try_for_each(|a| match a.strip_prefix("v1:").or_else(|| a.strip_prefix("v2:")) {
                    Some(rest) => parse_entity_addr(rest),
                    None => Err("expected v1: or v2: before each address in a vector".into()),
                })
            }
        }
        None => parse_entity_addr(m.strip_prefix("v1:").or_else(|| m.strip_prefix("v2:")).unwrap_or(m)),
    };
    result.map_err(|why| format!("{why}; expected host:port, v2:host:port[/nonce] or [v2:host:port,v1:host:port], got {:?}", quoted()))
}

/// `host:port` with an optional `/<nonce>`. Pure.
fn parse_entity_addr(a: &str) -> Result<(), String> {
    let hostport = match a.split_once('/') {
        Some((hp, nonce)) => {
            if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_digit()) || nonce.parse::<u32>().is_err() {
                return Err("expected a nonce of decimal digits after '/'".into());
            }
            hp
        }
        None => a,
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:").ok_or("expected [IPv6]:port")?;
        v6.parse::<Ipv6Addr>().map_err(|_| "expected an IPv6 address inside [ ]")?;
        (None, port)
    } else {
        let (host, port) = hostport.rsplit_once(':').ok_or("expected a port")?;
        (Some(host), port)
    };
    if let Some(host) = host {
        if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
            return Err("expected an IPv4 address, [IPv6] or a DNS name".into());
        }
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err("expected a port of 1..=65535".into()),
    }
}

/// RFC 1123: labels of 1..=63 letters, digits and inner hyphens, 253 bytes
/// in all; the last label not all digits (that is a mistyped IPv4). Pure.
fn is_dns_name(host: &str) -> bool {
    let labels_ok = host
        .split('.')
        .all(|l| (1..=63).contains(&l.len()) && !l.starts_with('-') && !l.ends_with('-') && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let last_not_numeric = host.rsplit('.').next().is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()));
    (1..=253).contains(&host.len()) && labels_ok && last_not_numeric
}

/// A `mon_host` value: monitors separated by commas or whitespace, the commas
/// inside an address vector's brackets not counting. Pure.
pub fn split_mon_host(value: &str) -> Vec<&str> {
    let mut parts = vec![];
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' | ' ' | '\t' if depth == 0 => {
                parts.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

// === ceph.conf ===

/// One problem in a ceph.conf body, by line (1-based; 0 for the whole body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfProblem {
    pub line: usize,
    pub problem: String,
}

/// What a task's ceph.conf says: its `mon_host` (if any) and the other
/// settings, normalised and in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedConf {
    pub mon_host: Option<String>,
    pub settings: Vec<(String, String)>,
}

/// Parses a ceph.conf body for `client.<client_id>`: sections `[global]`,
/// `[client]` and `[client.<client_id>]` only; `key = value` lines with keys
/// from [`ALLOWED_CONF_KEYS`] (or `mon_host`), each at most once; `#` and `;`
/// start a comment, on a line of its own or after a value. Quotes and
/// backslashes (Ceph's escapes and line continuations) are refused rather
/// than half understood. Pure.
pub fn parse_ceph_conf(text: &str, client_id: &str) -> Result<ParsedConf, Vec<ConfProblem>> {
    if text.len() > MAX_CEPH_CONF_BYTES {
        return Err(vec![ConfProblem { line: 0, problem: format!("expected at most {MAX_CEPH_CONF_BYTES} bytes, got {}; nothing was parsed", text.len()) }]);
    }
    let mut problems = vec![];
    let mut bad = |line: usize, problem: String| problems.push(ConfProblem { line, problem });
    let mut parsed = ParsedConf::default();
    let mut seen = BTreeSet::new();
    // None before the first header and inside a refused section: its lines are skipped.
    let mut in_allowed_section: Option<bool> = None;
    for (i, raw_line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if line.chars().any(|c| c.is_control() && c != '\t') {
            bad(n, "holds a control character".into());
            continue;
        }
        let content = strip_comment(line).trim();
        if content.is_empty() {
            continue;
        }
        if let Some(header) = content.strip_prefix('[') {
            let Some(name) = header.strip_suffix(']').map(str::trim) else {
                bad(n, "expected a section header [name]".into());
                in_allowed_section = Some(false);
                continue;
            };
            let allowed = name == "global" || name == "client" || name.strip_prefix("client.") == Some(client_id);
            if !allowed {
                bad(n, format!("section [{}] is not allowed; expected [global], [client] or [client.{client_id}]", truncate(name)));
            }
            in_allowed_section = Some(allowed);
            continue;
        }
        match in_allowed_section {
            None => {
                bad(n, "a setting before any section header; put it under [global] or [client]".into());
                in_allowed_section = Some(false);
                continue;
            }
            Some(false) => continue,
            Some(true) => {}
        }
        let Some((raw_key, value)) = content.split_once('=') else {
            bad(n, "expected key = value".into());
            continue;
        };
        let key = normalize_conf_key(raw_key);
        if key.len() > MAX_CONF_KEY_BYTES || (key != "mon_host" && !ALLOWED_CONF_KEYS.contains(&key.as_str())) {
            bad(
                n,
                format!(
                    "setting {:?} is not allowed: a task may set only client settings that name no path ({}, mon_host)",
                    truncate(&key),
                    ALLOWED_CONF_KEYS.join(", ")
                ),
            );
            continue;
        }
        let value = value.trim();
        if let Err(problem) = check_conf_value(value) {
            bad(n, format!("{key}: {problem}"));
            continue;
        }
        if !seen.insert(key.clone()) {
            bad(n, format!("{key} is set twice"));
            continue;
        }
        if key == "mon_host" {
            parsed.mon_host = Some(value.to_string());
        } else {
            parsed.settings.push((key, value.to_string()));
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

/// A line up to its first `#` or `;`. Pure.
fn strip_comment(line: &str) -> &str {
    line.split(['#', ';']).next().unwrap_or("")
}

/// Ceph reads `admin socket`, `admin-socket` and `admin_socket` as one option. Pure.
pub fn normalize_conf_key(key: &str) -> String {
    key.trim().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c.to_ascii_lowercase() }).collect()
}

fn check_conf_value(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_CONF_VALUE_BYTES {
        return Err(format!("expected a value of 1..={MAX_CONF_VALUE_BYTES} bytes, got {}", value.len()));
    }
    if value.contains('$') {
        // Ceph expands $name, $pid, $cluster and any other option's value.
        return Err("a value must not hold '$' (Ceph would expand it)".into());
    }
    if value.contains(['"', '\\']) {
        return Err("a value must not hold quotes or backslashes".into());
    }
    Ok(())
}

/// The task's ceph_conf, problems recorded under `field` by line; returns the
/// monitors of its mon_host (if given) and the other settings.
fn check_ceph_conf(p: &mut Problems, field: &str, text: &str, client_id: &str) -> (Option<Vec<String>>, Vec<(String, String)>) {
    let parsed = match parse_ceph_conf(text, client_id) {
        Ok(parsed) => parsed,
        Err(problems) => {
            for c in problems {
                let at = if c.line == 0 { String::new() } else { format!("line {}: ", c.line) };
                p.add(field, format!("{at}{}", c.problem));
            }
            return (None, vec![]);
        }
    };
    let monitors = parsed.mon_host.map(|value| {
        let monitors = split_mon_host(&value);
        if monitors.is_empty() || monitors.len() > MAX_MONITORS {
            p.add(field, format!("mon_host: expected 1..={MAX_MONITORS} monitors, got {}", monitors.len()));
        }
        for m in monitors.iter().take(MAX_MONITORS) {
            if let Err(problem) = parse_monitor(m) {
                p.add(field, format!("mon_host: {problem}"));
            }
        }
        monitors.into_iter().map(str::to_string).collect()
    });
    (monitors, parsed.settings)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A key in Ceph's encoding: type 1, a creation time, length 16, `secret`.
    pub fn encode_key(key_type: u16, secret: &[u8]) -> String {
        let mut bytes = vec![];
        bytes.extend_from_slice(&key_type.to_le_bytes());
        bytes.extend_from_slice(&0x6540_774c_u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&u16::try_from(secret.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(secret);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    pub fn good_key() -> String {
        encode_key(1, &[0x5a; 16])
    }

    pub fn good_rbd() -> pb::RbdVolume {
        pb::RbdVolume {
            pool: "builds".into(),
            namespace: "team-a".into(),
            image: "cache-01".into(),
            client_name: "client.buildkit".into(),
            key: good_key(),
            monitors: vec!["10.0.0.1:6789".into(), "[v2:10.0.0.2:3300,v1:10.0.0.2:6789]".into()],
            ceph_conf: "[global]\nfsid = 0b9c1b4e-5f8e-4c43-9d1c-000000000001\n[client]\nrbd cache = false\n".into(),
            size_bytes: 10 << 30,
            take_over_from: "3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5".into(),
        }
    }

    fn run(r: pb::RbdVolume) -> (Option<RbdImage>, Vec<(String, String)>) {
        let mut p = Problems::default();
        let image = validate_rbd(&mut p, "buildkit.mounts[0].rbd", r);
        (image, p.into_error().0.into_iter().map(|e| (e.field, e.problem)).collect())
    }

    fn fields(r: pb::RbdVolume) -> Vec<String> {
        run(r).1.into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn a_real_ceph_key_decodes_to_an_aes_key() {
        // Shaped like `ceph auth get-key` output: type 1, a 2023 creation time, 16 bytes.
        assert_eq!(check_key("AQBMd0BlAAAAABAAb9Ih5QBoRGXmqrxl0QWUZQ=="), Ok(()));
        assert_eq!(good_key().len(), KEY_BASE64_CHARS);
        assert_eq!(check_key(&good_key()), Ok(()));
    }

    #[test]
    fn keys_of_the_wrong_shape_are_refused_without_quoting_them() {
        let wrong_type = encode_key(0, &[7; 16]);
        let short_secret = encode_key(1, &[7; 15]);
        let long_secret = encode_key(1, &[7; 17]);
        let no_padding = good_key().trim_end_matches('=').to_string() + "AA";
        for key in [wrong_type.as_str(), &short_secret, &long_secret, &no_padding, "", "AQBMd0BlAAAAABAAb9Ih5QBoRGXmqrxl0QWUZQ= ", &"A".repeat(4096)] {
            let err = check_key(key).unwrap_err();
            assert!(key.is_empty() || !err.contains(key), "{err}");
        }
        // A secret with '+' or '/' in the url-safe alphabet is not a keyring's key.
        let with_specials = encode_key(1, &[0xfb; 16]);
        assert!(with_specials.contains('+') || with_specials.contains('/'));
        assert!(check_key(&with_specials).is_ok());
        assert!(check_key(&with_specials.replace('+', "-").replace('/', "_")).is_err());
    }

    #[test]
    fn a_good_rbd_volume_validates() {
        let (image, problems) = run(good_rbd());
        assert!(problems.is_empty(), "{problems:?}");
        let image = image.unwrap();
        assert_eq!(image.spec(), "builds/team-a/cache-01");
        assert_eq!(image.client_id, "buildkit");
        assert_eq!(image.monitors.len(), 2);
        assert_eq!(image.conf, [("fsid".to_string(), "0b9c1b4e-5f8e-4c43-9d1c-000000000001".to_string()), ("rbd_cache".into(), "false".into())]);
        assert_eq!(image.create_size_bytes, Some(10 << 30));
        assert_eq!(image.take_over_from.as_deref(), Some("3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5"));
        let mut minimal = good_rbd();
        minimal.namespace.clear();
        minimal.ceph_conf.clear();
        minimal.size_bytes = 0;
        minimal.take_over_from.clear();
        let image = run(minimal).0.unwrap();
        assert_eq!((image.namespace, image.create_size_bytes, image.take_over_from), (None, None, None));
    }

    #[test]
    fn every_bad_field_is_named_and_the_key_never_appears() {
        let mut r = good_rbd();
        r.pool = "-rf".into();
        r.namespace = "a/b".into();
        r.image = "img@snap".into();
        r.client_name = "admin".into();
        r.key = encode_key(2, &[9; 16]);
        r.monitors = vec!["10.0.0.1:0".into()];
        r.size_bytes = 1;
        r.take_over_from = "a b".into();
        let key = r.key.clone();
        let (image, problems) = run(r);
        assert!(image.is_none());
        let f: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        let base = "buildkit.mounts[0].rbd";
        for want in ["pool", "namespace", "image", "client_name", "key", "monitors[0]", "size_bytes", "take_over_from"] {
            assert!(f.contains(&format!("{base}.{want}").as_str()), "{want} not in {f:?}");
        }
        assert!(problems.iter().all(|(_, p)| !p.contains(&key)), "{problems:?}");
    }

    #[test]
    fn the_validated_image_never_shows_its_key_in_debug() {
        let r = good_rbd();
        let key = r.key.clone();
        let image = run(r).0.unwrap();
        assert!(!format!("{image:?}").contains(&key));
    }

    #[test]
    fn names_follow_cephs_rules_and_ours() {
        for good in ["rbd", "a", "Pool_1.x-y", &"a".repeat(MAX_RBD_NAME_BYTES)] {
            assert_eq!(check_rbd_name(good, MAX_RBD_NAME_BYTES), Ok(()), "{good}");
        }
        for bad in ["", "-x", ".x", "a/b", "a@b", "a b", "a\nb", "a\0b", "é", "a=b", &"a".repeat(MAX_RBD_NAME_BYTES + 1)] {
            assert!(check_rbd_name(bad, MAX_RBD_NAME_BYTES).is_err(), "{bad:?}");
        }
        let mut r = good_rbd();
        r.client_name = format!("client.{}", "a".repeat(MAX_CLIENT_ID_BYTES + 1));
        assert_eq!(fields(r), ["buildkit.mounts[0].rbd.client_name"]);
        for bad in ["client.", "client", "client.-x", "client.a/b", "mon.a"] {
            let mut r = good_rbd();
            r.client_name = bad.into();
            assert_eq!(fields(r), ["buildkit.mounts[0].rbd.client_name"], "{bad}");
        }
    }

    #[test]
    fn owner_ids_are_plain_tokens() {
        assert!(is_owner_id("3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5"));
        assert!(is_owner_id("builder-7.eu:west_1"));
        for bad in ["", "a b", "a/b", "a\n", &"a".repeat(MAX_OWNER_ID_BYTES + 1)] {
            assert!(!is_owner_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn monitor_addresses_parse() {
        for good in [
            "10.0.0.1:6789",
            "v1:10.0.0.1:6789",
            "v2:10.0.0.1:3300/0",
            "v2:10.0.0.1:3300/4294967295",
            "[::1]:6789",
            "v2:[fd00::1]:3300",
            "mon-a.ceph.example.com:6789",
            "mon1:3300",
            "[v2:10.0.0.1:3300,v1:10.0.0.1:6789]",
            "[v2:[fd00::1]:3300/7,v1:[fd00::1]:6789/7]",
        ] {
            assert_eq!(parse_monitor(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn hostile_monitor_addresses_are_refused() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "10.0.0.1:6789 ",
            " 10.0.0.1:6789",
            "10.0.0.1:6789,10.0.0.2:6789",
            "10.0.0.1:6789\n",
            "a=b:1",
            "1.2.3:6789",
            "999.1.1.1:6789",
            "-mon:6789",
            "mon-:6789",
            "mon..a:6789",
            "[::1]",
            "[not-v6]:6789",
            "::1:6789",
            "v3:10.0.0.1:6789",
            "[10.0.0.1:6789]",
            "[v2:10.0.0.1:3300,10.0.0.1:6789]",
            "[v2:10.0.0.1:3300,v1:10.0.0.1:6789,v1:a:1,v1:b:1,v1:c:1]",
            "v2:10.0.0.1:3300/",
            "v2:10.0.0.1:3300/x",
            "v2:10.0.0.1:3300/99999999999",
            "10.0.0.1:6789;rm",
            "$(id):1",
            &format!("{}:6789", "a".repeat(300)),
            &format!("{}.com:6789", "a.".repeat(200)),
            &"x".repeat(1 << 20),
        ] {
            let err = parse_monitor(bad).unwrap_err();
            assert!(err.len() < 512, "{}", err.len());
        }
    }

    #[test]
    fn mon_host_splits_outside_brackets() {
        assert_eq!(split_mon_host("a:1,b:2 c:3"), ["a:1", "b:2", "c:3"]);
        assert_eq!(split_mon_host("[v2:a:1,v1:a:2], [v2:b:1,v1:b:2]"), ["[v2:a:1,v1:a:2]", "[v2:b:1,v1:b:2]"]);
        assert!(split_mon_host(" , ").is_empty());
    }

    #[test]
    fn monitors_come_from_one_place() {
        let conf_mon = "[global]\nmon host = 10.0.0.1:6789, [v2:10.0.0.2:3300,v1:10.0.0.2:6789]\n";
        let mut r = good_rbd();
        r.monitors.clear();
        r.ceph_conf = conf_mon.into();
        let image = run(r).0.unwrap();
        assert_eq!(image.monitors, ["10.0.0.1:6789", "[v2:10.0.0.2:3300,v1:10.0.0.2:6789]"]);
        assert!(image.conf.is_empty(), "mon_host is not a setting");

        let mut both = good_rbd();
        both.ceph_conf = conf_mon.into();
        assert_eq!(fields(both), ["buildkit.mounts[0].rbd.monitors"]);
        let mut neither = good_rbd();
        neither.monitors.clear();
        assert_eq!(fields(neither), ["buildkit.mounts[0].rbd.monitors"]);
        let mut too_many = good_rbd();
        too_many.monitors = vec!["10.0.0.1:6789".into(); MAX_MONITORS + 1];
        assert_eq!(fields(too_many), ["buildkit.mounts[0].rbd.monitors"]);
        let mut bad_conf_mon = good_rbd();
        bad_conf_mon.monitors.clear();
        bad_conf_mon.ceph_conf = "[global]\nmon_host = 10.0.0.1\n".into();
        assert_eq!(fields(bad_conf_mon), ["buildkit.mounts[0].rbd.ceph_conf"]);
    }

    #[test]
    fn conf_keys_outside_the_allow_list_are_refused_by_key_and_line() {
        for (key, normal) in [
            ("admin socket", "admin_socket"),
            ("log file", "log_file"),
            ("keyring", "keyring"),
            ("key", "key"),
            ("keyfile", "keyfile"),
            ("run dir", "run_dir"),
            ("plugin dir", "plugin_dir"),
            ("erasure code dir", "erasure_code_dir"),
            ("$name", "$name"),
        ] {
            let text = format!("[global]\nfsid = x\n{key} = /tmp/x\n");
            let problems = parse_ceph_conf(&text, "buildkit").unwrap_err();
            assert_eq!(problems.len(), 1, "{key}: {problems:?}");
            assert_eq!(problems[0].line, 3);
            assert!(problems[0].problem.contains(normal), "{problems:?}");
        }
    }

    #[test]
    fn conf_sections_values_and_duplicates_are_checked() {
        let ok = parse_ceph_conf("# comment\n; another\n[global]\r\n  Rbd-Cache = true ; inline\n[client.buildkit]\nms_mode = secure\n", "buildkit").unwrap();
        assert_eq!(ok.settings, [("rbd_cache".to_string(), "true".to_string()), ("ms_mode".into(), "secure".into())]);
        let cases: &[(&str, usize)] = &[
            ("fsid = x\n", 1),
            ("[osd]\nfsid = x\n", 1),
            ("[client.other]\nfsid = x\n", 1),
            ("[global\n", 1),
            ("[global]\nfsid\n", 2),
            ("[global]\nfsid = $host\n", 2),
            ("[global]\nfsid = \"x\"\n", 2),
            ("[global]\nfsid = a\\\n", 2),
            ("[global]\nfsid = a\0b\n", 2),
            ("[global]\nfsid = \n", 2),
            ("[global]\nfsid = a\n[client]\nfsid = b\n", 4),
            (&format!("[global]\nfsid = {}\n", "a".repeat(MAX_CONF_VALUE_BYTES + 1)), 2),
            (&format!("[global]\n{} = a\n", "a".repeat(4096)), 2),
        ];
        for (text, line) in cases {
            let problems = parse_ceph_conf(text, "buildkit").unwrap_err();
            assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), [*line], "{text:?}: {problems:?}");
            assert!(problems.iter().all(|p| p.problem.len() < 1024));
        }
    }

    #[test]
    fn an_oversized_conf_is_one_problem_and_not_parsed() {
        let text = "[osd]\n".repeat(MAX_CEPH_CONF_BYTES);
        let problems = parse_ceph_conf(&text, "buildkit").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, 0);
        let mut r = good_rbd();
        r.ceph_conf = text;
        assert_eq!(fields(r), ["buildkit.mounts[0].rbd.ceph_conf"]);
    }

    #[test]
    fn a_conf_problem_names_the_field_and_line() {
        let mut r = good_rbd();
        r.ceph_conf = "[global]\nlog file = /etc/shadow\n".into();
        let (_, problems) = run(r);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "buildkit.mounts[0].rbd.ceph_conf");
        assert!(problems[0].1.starts_with("line 2: setting \"log_file\""), "{}", problems[0].1);
    }

    #[test]
    fn size_is_zero_or_a_volume_size() {
        for (size, ok) in [(0, true), (MIN_VOLUME_BYTES, true), (MAX_VOLUME_BYTES, true), (MIN_VOLUME_BYTES - 1, false), (MAX_VOLUME_BYTES + 1, false)] {
            let mut r = good_rbd();
            r.size_bytes = size;
            assert_eq!(run(r).0.is_some(), ok, "{size}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_parsers_never_panic_and_their_problems_stay_short(text in "[\\PC\\n\\r\\t\\[\\]=:,/#;$ ]{0,200}") {
            if let Err(problem) = parse_monitor(&text) {
                prop_assert!(problem.len() < 512);
            }
            let _ = check_key(&text);
            let _ = split_mon_host(&text);
            if let Err(problems) = parse_ceph_conf(&text, "buildkit") {
                prop_assert!(problems.iter().all(|p| p.problem.len() < 1024));
            }
        }
    }
}
