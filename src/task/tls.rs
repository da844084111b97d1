//! The engine's mTLS material: the task's PEM text checked ([`check`], pure),
//! then written where buildkitd reads it ([`write`], I/O).
//!
//! [`check`] proves, before anything touches the disk, that buildkitd will be
//! able to load what it is given and that clients will accept it:
//!
//! - `cert_pem` holds one or more certificates and nothing else; the first is
//!   the leaf (the engine's server certificate), any others are its chain, in
//!   order: each one must be signed by the next. This is the order Go's
//!   `tls.LoadX509KeyPair` sends them in.
//! - `key_pem` holds exactly one private key (PKCS#8, SEC1 EC or PKCS#1 RSA;
//!   RSA, ECDSA P-256/P-384 or Ed25519) and it matches the leaf's public key.
//! - `ca_pem` holds one or more CA certificates (basicConstraints CA:TRUE).
//!   buildkitd uses it as the pool that *client* certificates must chain to
//!   (with a CA configured it requires and verifies client certificates), so
//!   the server chain is not required to chain to it: the proto defines it as
//!   "the CA that client certificates must chain to", and the server
//!   certificate may come from another issuer.
//! - every certificate of both fields is inside its validity window at `now`;
//!   a `notBefore` up to [`CLOCK_SKEW_ALLOWANCE`] in the future is accepted.
//!
//! Size limits are not checked here: task validation already refuses a PEM
//! field over `task::MAX_PEM_BYTES` before this module sees it.
//!
//! No error ever carries key material: a PEM block of the wrong kind is named
//! by its position, never echoed, and key parse errors are not passed through.

use crate::secret::Secret;
use crate::task::TlsMaterial;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// A certificate minted a moment ago by a control plane whose clock runs
/// slightly ahead of this VM's must not fail the task; five minutes is the
/// usual tolerance (Kerberos' default) and far below any certificate lifetime.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// The certificate and CA are public; the dir (0700) is what keeps others out,
/// and 0644 marks them as the non-secret files.
const PUBLIC_FILE_MODE: u32 = 0o644;
/// The key is secret: readable by root (buildkitd) only.
const KEY_FILE_MODE: u32 = 0o600;
/// Subjects quoted in errors are cut: a certificate is untrusted input.
const MAX_SUBJECT_CHARS: usize = 128;

/// Where [`write`] put the files: what buildkitd.toml's `[grpc.tls]` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsPaths {
    /// The file names [`write`] uses under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { cert: dir.join("cert.pem"), key: dir.join("key.pem"), ca: dir.join("ca.pem") }
    }
}

/// TLS material that passed [`check`]; only [`check`] makes one, so [`write`]
/// can never put unchecked material on disk.
#[derive(Debug, Clone)]
pub struct CheckedTls {
    cert_pem: String,
    key_pem: Secret,
    ca_pem: String,
    leaf_subject: String,
    leaf_not_after: SystemTime,
}

impl CheckedTls {
    /// The leaf's subject, for logs.
    pub fn leaf_subject(&self) -> &str {
        &self.leaf_subject
    }

    /// When the leaf expires: the engine must get new material before then.
    pub fn leaf_not_after(&self) -> SystemTime {
        self.leaf_not_after
    }
}

/// The task field a problem is in, named as task validation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsField {
    Cert,
    Key,
    Ca,
}

impl fmt::Display for TlsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cert => "buildkit.tls.cert_pem",
            Self::Key => "buildkit.tls.key_pem",
            Self::Ca => "buildkit.tls.ca_pem",
        })
    }
}

/// Why the TLS material was refused or could not be written.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum TlsError {
    /// {field}: is not valid PEM
    BadPem { field: TlsField },
    /// {field}: PEM block {index} is not a certificate (the block is not shown: it may be key material)
    NotACertificate { field: TlsField, index: usize },
    /// {field}: holds no certificate
    NoCertificate { field: TlsField },
    /// {field}: certificate {index} is not valid X.509: {reason}
    BadCertificate { field: TlsField, index: usize, reason: String },
    /// buildkit.tls.key_pem: holds a PEM block that is not a private key (the block is not shown)
    NotAKey,
    /// buildkit.tls.key_pem: expected exactly one private key, found {0}
    KeyCount(usize),
    /// buildkit.tls.key_pem: not a usable private key (expected RSA, ECDSA P-256/P-384 or Ed25519 as PKCS#8, SEC1 or PKCS#1)
    BadKey,
    /// buildkit.tls.key_pem: does not match the public key of buildkit.tls.cert_pem's first certificate ({subject})
    KeyMismatch { subject: String },
    /// {field}: certificate {index} ({subject}) expired at {not_after}
    Expired { field: TlsField, index: usize, subject: String, not_after: String },
    /// {field}: certificate {index} ({subject}) is not valid before {not_before}
    NotYetValid { field: TlsField, index: usize, subject: String, not_before: String },
    /// buildkit.tls.cert_pem: certificate {index} ({subject}) is not signed by certificate {issuer_index}: the chain must run from the leaf towards the root, in order
    BrokenChain { index: usize, subject: String, issuer_index: usize },
    /// buildkit.tls.ca_pem: certificate {index} ({subject}) is not a CA certificate (no basicConstraints CA:TRUE)
    NotACa { index: usize, subject: String },
    /// cannot create the TLS directory {path}: {source}
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {path} exists and is not a directory
    NotADirectory { path: PathBuf },
    /// cannot write {path}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TlsError {
    /// The task field the problem is in (the cert's for I/O errors, which name their path).
    pub fn field(&self) -> TlsField {
        match self {
            Self::BadPem { field }
            | Self::NotACertificate { field, .. }
            | Self::NoCertificate { field }
            | Self::BadCertificate { field, .. }
            | Self::Expired { field, .. }
            | Self::NotYetValid { field, .. } => *field,
            Self::NotAKey | Self::KeyCount(_) | Self::BadKey | Self::KeyMismatch { .. } => TlsField::Key,
            Self::NotACa { .. } => TlsField::Ca,
            Self::BrokenChain { .. } | Self::CreateDir { .. } | Self::NotADirectory { .. } | Self::Write { .. } => TlsField::Cert,
        }
    }
}

// === check ===

/// Checks the task's TLS material at `now` (see the module doc for every
/// rule). Pure: reads nothing but its arguments.
pub fn check(material: &TlsMaterial, now: SystemTime) -> Result<CheckedTls, TlsError> {
    let now_secs = unix_secs(now);
    let skew = i64::try_from(CLOCK_SKEW_ALLOWANCE.as_secs()).unwrap_or(i64::MAX);

    let chain_der = read_certificates(TlsField::Cert, &material.cert_pem)?;
    let chain = parse_certificates(TlsField::Cert, &chain_der)?;
    let ca_der = read_certificates(TlsField::Ca, &material.ca_pem)?;
    let cas = parse_certificates(TlsField::Ca, &ca_der)?;

    // The key first: a wrong key is the mistake most worth naming, and it
    // does not depend on the clock.
    let leaf = chain.first().ok_or(TlsError::NoCertificate { field: TlsField::Cert })?;
    let key_spki = key_public_key(material.key_pem.expose())?;
    let key_spki = SubjectPublicKeyInfo::from_der(&key_spki).map_err(|_| TlsError::BadKey)?.1;
    let leaf_spki = leaf.public_key();
    if key_spki.algorithm.algorithm != leaf_spki.algorithm.algorithm || key_spki.subject_public_key.data != leaf_spki.subject_public_key.data {
        return Err(TlsError::KeyMismatch { subject: subject(leaf) });
    }

    for (index, pair) in chain.windows(2).enumerate() {
        if let [cert, issuer] = pair {
            match cert.verify_signature(Some(issuer.public_key())) {
                // An algorithm ring cannot verify says nothing about the chain; TLS clients judge it.
                Ok(()) | Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {}
                Err(_) => return Err(TlsError::BrokenChain { index, subject: subject(cert), issuer_index: index + 1 }),
            }
        }
    }

    for (index, ca) in cas.iter().enumerate() {
        if !ca.is_ca() {
            return Err(TlsError::NotACa { index, subject: subject(ca) });
        }
    }

    for (field, certs) in [(TlsField::Cert, &chain), (TlsField::Ca, &cas)] {
        for (index, cert) in certs.iter().enumerate() {
            let validity = cert.validity();
            if validity.not_after.timestamp() < now_secs {
                return Err(TlsError::Expired { field, index, subject: subject(cert), not_after: validity.not_after.to_string() });
            }
            if validity.not_before.timestamp() > now_secs.saturating_add(skew) {
                return Err(TlsError::NotYetValid { field, index, subject: subject(cert), not_before: validity.not_before.to_string() });
            }
        }
    }

    let leaf_not_after = system_time(leaf.validity().not_after.timestamp());
    Ok(CheckedTls {
        cert_pem: material.cert_pem.clone(),
        key_pem: material.key_pem.clone(),
        ca_pem: material.ca_pem.clone(),
        leaf_subject: subject(leaf),
        leaf_not_after,
    })
}

/// Every PEM block of `pem`, which must all be certificates, at least one.
fn read_certificates(field: TlsField, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut certs = vec![];
    for (index, item) in rustls_pemfile::read_all(&mut pem.as_bytes()).enumerate() {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => certs.push(der),
            Ok(_) => return Err(TlsError::NotACertificate { field, index }),
            Err(_) => return Err(TlsError::BadPem { field }),
        }
    }
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { field });
    }
    Ok(certs)
}

fn parse_certificates<'a>(field: TlsField, ders: &'a [CertificateDer<'static>]) -> Result<Vec<X509Certificate<'a>>, TlsError> {
    ders.iter()
        .enumerate()
        .map(|(index, der)| match X509Certificate::from_der(der.as_ref()) {
            Ok(([], cert)) => Ok(cert),
            Ok(_) => Err(TlsError::BadCertificate { field, index, reason: "trailing bytes after the certificate".into() }),
            Err(e) => Err(TlsError::BadCertificate { field, index, reason: e.to_string() }),
        })
        .collect()
}

/// The SubjectPublicKeyInfo (DER) of the one private key in `pem`, derived by
/// the same crypto provider the agent's rustls uses, so a key it cannot load
/// is refused here.
fn key_public_key(pem: &str) -> Result<Vec<u8>, TlsError> {
    let mut keys: Vec<PrivateKeyDer<'static>> = vec![];
    for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
        match item {
            Ok(rustls_pemfile::Item::Pkcs8Key(k)) => keys.push(k.into()),
            Ok(rustls_pemfile::Item::Sec1Key(k)) => keys.push(k.into()),
            Ok(rustls_pemfile::Item::Pkcs1Key(k)) => keys.push(k.into()),
            Ok(_) => return Err(TlsError::NotAKey),
            // Not BadPem { field }: the parser's message is not passed on for the key field.
            Err(_) => return Err(TlsError::BadKey),
        }
    }
    let key = match keys.len() {
        1 => keys.remove(0),
        n => return Err(TlsError::KeyCount(n)),
    };
    let signing_key = rustls::crypto::ring::default_provider().key_provider.load_private_key(key).map_err(|_| TlsError::BadKey)?;
    let spki = signing_key.public_key().ok_or(TlsError::BadKey)?;
    Ok(spki.as_ref().to_vec())
}

/// The subject as one printable line, cut short.
fn subject(cert: &X509Certificate<'_>) -> String {
    let text = cert.subject().to_string();
    let clean: String = text.chars().filter(|c| !c.is_control()).take(MAX_SUBJECT_CHARS).collect();
    if clean.is_empty() {
        "no subject".into()
    } else {
        clean
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn system_time(unix_secs: i64) -> SystemTime {
    match u64::try_from(unix_secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_secs.unsigned_abs()),
    }
}

// === write ===

/// Writes checked material to `dir` as cert.pem, key.pem and ca.pem.
///
/// `dir` is created 0700 (its mode is corrected if it already exists), each
/// file is replaced atomically (temp file in `dir`, fsync, rename, fsync of
/// `dir`), key.pem is 0600 and the public files 0644. The three files are not
/// replaced as one: buildkitd reads them only when it starts, and the agent
/// starts it only after this returns Ok; after an error, nothing is started.
pub fn write(dir: &Path, checked: &CheckedTls) -> Result<TlsPaths, TlsError> {
    create_private_dir(dir)?;
    let paths = TlsPaths::in_dir(dir);
    write_file(&paths.key, checked.key_pem.expose().as_bytes(), KEY_FILE_MODE)?;
    write_file(&paths.cert, checked.cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
    write_file(&paths.ca, checked.ca_pem.as_bytes(), PUBLIC_FILE_MODE)?;
    Ok(paths)
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    use crate::fsutil::PrivateDirError;
    crate::fsutil::ensure_private_dir(dir).map_err(|e| match e {
        PrivateDirError::Create { path, source } => TlsError::CreateDir { path, source },
        PrivateDirError::NotADirectory { path } => TlsError::NotADirectory { path },
    })
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::fsutil::write_atomic(path, contents, mode).map_err(|source| TlsError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;

    /// 2030-06-01: inside every certificate's window below unless a test moves it.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_906_416_000)
    }

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2031, 1, 1);
        let key = KeyPair::generate().unwrap();
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    fn leaf_params(from: (i32, u8, u8), to: (i32, u8, u8)) -> CertificateParams {
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "engine");
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        params
    }

    /// A leaf for `key` signed by `ca`, valid through 2030.
    fn material_for(ca: &Ca, key: &KeyPair, key_pem: String) -> TlsMaterial {
        let cert = leaf_params((2030, 1, 1), (2031, 1, 1)).signed_by(key, &ca.cert, &ca.key).unwrap();
        TlsMaterial { cert_pem: cert.pem(), key_pem: Secret::new(key_pem), ca_pem: ca.cert.pem() }
    }

    fn good() -> (Ca, TlsMaterial) {
        let ca = ca("test CA");
        let key = KeyPair::generate().unwrap();
        let m = material_for(&ca, &key, key.serialize_pem());
        (ca, m)
    }

    /// The same key in OpenSSL's "traditional" form: SEC1 for EC, PKCS#1 for RSA.
    fn traditional(pkcs8_pem: &str) -> String {
        openssl(&["pkey", "-traditional"], pkcs8_pem)
    }

    fn openssl(args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (CI installs it) makes the RSA and traditional-format keys");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    fn err(m: &TlsMaterial) -> TlsError {
        check(m, now()).unwrap_err()
    }

    #[test]
    fn good_material_passes_and_reports_the_leaf() {
        let (_, m) = good();
        let c = check(&m, now()).unwrap();
        assert_eq!(c.leaf_subject(), "CN=engine");
        assert_eq!(c.leaf_not_after(), UNIX_EPOCH + Duration::from_secs(1_924_992_000));
        // 2031-01-01
    }

    #[test]
    fn ec_keys_in_sec1_and_p384_and_ed25519_keys_pass() {
        let ca = ca("test CA");
        let p256 = KeyPair::generate().unwrap();
        let sec1 = traditional(&p256.serialize_pem());
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
        check(&material_for(&ca, &p256, sec1), now()).unwrap();
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            check(&material_for(&ca, &key, key.serialize_pem()), now()).unwrap();
        }
    }

    #[test]
    fn rsa_keys_in_pkcs8_and_pkcs1_pass() {
        let ca = ca("test CA");
        let pkcs8 = openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], "");
        let key = KeyPair::from_pem(&pkcs8).unwrap();
        check(&material_for(&ca, &key, pkcs8.clone()), now()).unwrap();
        let pkcs1 = traditional(&pkcs8);
        assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
        check(&material_for(&ca, &key, pkcs1), now()).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (_, mut m) = good();
        m.key_pem = Secret::new(KeyPair::generate().unwrap().serialize_pem());
        let e = err(&m);
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert_eq!(e.to_string(), "buildkit.tls.key_pem: does not match the public key of buildkit.tls.cert_pem's first certificate (CN=engine)");
    }

    #[test]
    fn malformed_material_is_named_by_field() {
        let (_, good) = good();
        let cases: Vec<(TlsMaterial, &str)> = vec![
            (TlsMaterial { cert_pem: String::new(), ..good.clone() }, "buildkit.tls.cert_pem: holds no certificate"),
            (TlsMaterial { cert_pem: "no pem here".into(), ..good.clone() }, "buildkit.tls.cert_pem: holds no certificate"),
            (
                TlsMaterial { cert_pem: "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUZ3Jvb3Q=\n-----END CERTIFICATE-----\n".into(), ..good.clone() },
                "buildkit.tls.cert_pem: certificate 0 is not valid X.509",
            ),
            (
                TlsMaterial { cert_pem: "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into(), ..good.clone() },
                "buildkit.tls.cert_pem: is not valid PEM",
            ),
            (TlsMaterial { ca_pem: String::new(), ..good.clone() }, "buildkit.tls.ca_pem: holds no certificate"),
            (TlsMaterial { key_pem: Secret::new(""), ..good.clone() }, "buildkit.tls.key_pem: expected exactly one private key, found 0"),
            (TlsMaterial { key_pem: Secret::new(good.cert_pem.clone()), ..good.clone() }, "buildkit.tls.key_pem: holds a PEM block that is not a private key"),
            (
                TlsMaterial {
                    key_pem: Secret::new("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"),
                    ..good.clone()
                },
                "buildkit.tls.key_pem: not a usable private key",
            ),
        ];
        for (m, expected) in cases {
            let e = err(&m).to_string();
            assert!(e.starts_with(expected), "expected {expected:?}, got {e:?}");
        }
    }

    #[test]
    fn two_keys_are_refused() {
        let (_, mut m) = good();
        let two = format!("{}{}", m.key_pem.expose(), KeyPair::generate().unwrap().serialize_pem());
        m.key_pem = Secret::new(two);
        assert_eq!(err(&m).to_string(), "buildkit.tls.key_pem: expected exactly one private key, found 2");
    }

    #[test]
    fn a_private_key_in_a_certificate_field_is_refused_without_echoing_it() {
        let (_, good) = good();
        let key = good.key_pem.expose().to_string();
        let body: String = key.lines().nth(1).unwrap().to_string();
        for m in [TlsMaterial { cert_pem: format!("{}{key}", good.cert_pem), ..good.clone() }, TlsMaterial { ca_pem: key.clone(), ..good.clone() }] {
            let e = err(&m);
            assert!(matches!(e, TlsError::NotACertificate { .. }), "{e}");
            let text = format!("{e} {e:?}");
            assert!(!text.contains(&body) && !text.contains("PRIVATE KEY-----"), "{text}");
        }
        let e = err(&TlsMaterial { ca_pem: key, ..good.clone() });
        assert_eq!(e.to_string(), "buildkit.tls.ca_pem: PEM block 0 is not a certificate (the block is not shown: it may be key material)");
    }

    #[test]
    fn no_error_shows_the_key() {
        let (_, good) = good();
        let key = good.key_pem.expose().to_string();
        let body: String = key.lines().nth(1).unwrap().to_string();
        let truncated = key.lines().take(2).collect::<Vec<_>>().join("\n");
        for bad_key in [truncated, key.replace('A', "B"), format!("{key}{key}"), key.replace("PRIVATE KEY", "CERTIFICATE")] {
            if let Err(e) = check(&TlsMaterial { key_pem: Secret::new(bad_key), ..good.clone() }, now()) {
                let text = format!("{e} {e:?}");
                assert!(!text.contains(&body), "{text}");
            }
        }
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let ca = ca("test CA");
        let key = KeyPair::generate().unwrap();
        let expired = leaf_params((2029, 1, 1), (2030, 3, 1)).signed_by(&key, &ca.cert, &ca.key).unwrap();
        let m = TlsMaterial { cert_pem: expired.pem(), key_pem: Secret::new(key.serialize_pem()), ca_pem: ca.cert.pem() };
        assert_eq!(err(&m).to_string(), "buildkit.tls.cert_pem: certificate 0 (CN=engine) expired at Mar  1 00:00:00 2030 +00:00");

        let future = leaf_params((2030, 9, 1), (2031, 1, 1)).signed_by(&key, &ca.cert, &ca.key).unwrap();
        let m = TlsMaterial { cert_pem: future.pem(), ..m };
        assert_eq!(err(&m).to_string(), "buildkit.tls.cert_pem: certificate 0 (CN=engine) is not valid before Sep  1 00:00:00 2030 +00:00");
    }

    #[test]
    fn a_not_before_within_the_skew_allowance_is_accepted() {
        let (_, m) = good();
        let not_before = UNIX_EPOCH + Duration::from_secs(1_893_456_000); // 2030-01-01
        check(&m, not_before - CLOCK_SKEW_ALLOWANCE).unwrap();
        assert!(matches!(check(&m, not_before - CLOCK_SKEW_ALLOWANCE - Duration::from_secs(1)), Err(TlsError::NotYetValid { .. })));
    }

    #[test]
    fn an_expired_ca_is_refused() {
        let (_, good) = good();
        let m = good.clone();
        let after_ca = UNIX_EPOCH + Duration::from_secs(1_924_992_000 + 1);
        // The leaf expires with the CA here; an expired CA alone:
        let mut old = CertificateParams::new(Vec::<String>::new()).unwrap();
        old.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        old.distinguished_name.push(DnType::CommonName, "old CA");
        old.not_before = rcgen::date_time_ymd(2020, 1, 1);
        old.not_after = rcgen::date_time_ymd(2030, 2, 1);
        let old = old.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let m2 = TlsMaterial { ca_pem: format!("{}{}", good.ca_pem, old.pem()), ..good };
        assert_eq!(err(&m2).to_string(), "buildkit.tls.ca_pem: certificate 1 (CN=old CA) expired at Feb  1 00:00:00 2030 +00:00");
        assert!(matches!(check(&m, after_ca), Err(TlsError::Expired { field: TlsField::Cert, .. })));
    }

    #[test]
    fn a_ca_field_holding_a_leaf_is_refused() {
        let (_, good) = good();
        let m = TlsMaterial { ca_pem: good.cert_pem.clone(), ..good };
        assert_eq!(err(&m).to_string(), "buildkit.tls.ca_pem: certificate 0 (CN=engine) is not a CA certificate (no basicConstraints CA:TRUE)");
    }

    #[test]
    fn a_chain_must_be_in_order() {
        let root = ca("root");
        let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ip.distinguished_name.push(DnType::CommonName, "intermediate");
        ip.not_before = rcgen::date_time_ymd(2030, 1, 1);
        ip.not_after = rcgen::date_time_ymd(2031, 1, 1);
        let inter_key = KeyPair::generate().unwrap();
        let inter = ip.signed_by(&inter_key, &root.cert, &root.key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = leaf_params((2030, 1, 1), (2031, 1, 1)).signed_by(&key, &inter, &inter_key).unwrap();
        let m = TlsMaterial { cert_pem: format!("{}{}", leaf.pem(), inter.pem()), key_pem: Secret::new(key.serialize_pem()), ca_pem: root.cert.pem() };
        check(&m, now()).unwrap();
        let other = ca("other");
        let wrong = TlsMaterial { cert_pem: format!("{}{}", leaf.pem(), other.cert.pem()), ..m };
        assert_eq!(
            err(&wrong).to_string(),
            "buildkit.tls.cert_pem: certificate 0 (CN=engine) is not signed by certificate 1: the chain must run from the leaf towards the root, in order"
        );
    }

    #[test]
    fn a_server_certificate_from_another_issuer_than_the_client_ca_is_accepted() {
        let (_, m) = good();
        let clients = ca("client CA");
        check(&TlsMaterial { ca_pem: clients.cert.pem(), ..m }, now()).unwrap();
    }

    // === write ===

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn write_makes_a_private_dir_with_a_secret_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("engine/tls");
        let (_, m) = good();
        let paths = write(&dir, &check(&m, now()).unwrap()).unwrap();
        assert_eq!(paths, TlsPaths::in_dir(&dir));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&paths.key), 0o600);
        assert_eq!(mode(&paths.cert), 0o644);
        assert_eq!(mode(&paths.ca), 0o644);
        assert_eq!(std::fs::read_to_string(&paths.key).unwrap(), m.key_pem.expose());
        assert_eq!(std::fs::read_to_string(&paths.cert).unwrap(), m.cert_pem);
        assert_eq!(std::fs::read_to_string(&paths.ca).unwrap(), m.ca_pem);
    }

    #[test]
    fn write_replaces_existing_files_fixes_modes_and_leaves_no_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["cert.pem", "key.pem", "ca.pem"] {
            std::fs::write(dir.join(name), "old").unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let (_, m) = good();
        let paths = write(&dir, &check(&m, now()).unwrap()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&paths.key), 0o600);
        assert_eq!(mode(&paths.cert), 0o644);
        assert_eq!(std::fs::read_to_string(&paths.key).unwrap(), m.key_pem.expose());
        assert_eq!(names(&dir), ["ca.pem", "cert.pem", "key.pem"]);

        // A second write (new material) replaces the first the same way.
        let (_, m2) = good();
        write(&dir, &check(&m2, now()).unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(&paths.cert).unwrap(), m2.cert_pem);
        assert_eq!(names(&dir), ["ca.pem", "cert.pem", "key.pem"]);
    }

    #[test]
    fn write_refuses_a_symlink_or_file_in_place_of_the_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = tmp.path().join("tls");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (_, m) = good();
        let c = check(&m, now()).unwrap();
        assert!(matches!(write(&link, &c), Err(TlsError::NotADirectory { .. })));
        assert!(names(&target).is_empty());
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(write(&file, &c), Err(TlsError::CreateDir { .. })));
    }

    #[test]
    fn checked_material_debug_hides_the_key() {
        let (_, m) = good();
        let c = check(&m, now()).unwrap();
        let body = m.key_pem.expose().lines().nth(1).unwrap().to_string();
        assert!(!format!("{c:?}").contains(&body));
    }
}
