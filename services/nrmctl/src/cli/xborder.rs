//! `nrmctl xborder …`: the keys a country's deployment needs to cross the
//! border, made offline (no service is called).
//!
//! - `xborder keygen --country CC --dir DIR`: the country's X25519 key pair
//!   for sealing (`NRM_XBORDER__PRIVATE_KEY_FILE`, `NRM_XBORDER__PARTNERS`):
//!   `DIR/CC.key` (mode 0600, stays in that country) and `DIR/CC.pub` (given
//!   to the partners). An existing key is never replaced without `--force`.
//! - `xborder tls --dir DIR --name NAME`: TLS for one leaf-node link: a link
//!   CA (made once, in `--ca-dir`, default DIR), a certificate for the hub
//!   (server; SAN 127.0.0.1 and localhost, and each `--san`) and one for the
//!   leaf (client), signed by that CA. PEM files; private keys mode 0600.
//!
//! Each writes one line `wrote PATH` (or `kept PATH`) per file on standard
//! output, nothing else there; notes go to standard error.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use nrm_kernel::xborder::{CountryCode, CountryKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use secrecy::ExposeSecret as _;

/// Keys for crossing the border (offline; no service is called).
#[derive(Debug, Subcommand)]
pub enum XborderCommand {
    /// Make this country's key pair for sealing what crosses: DIR/CC.key
    /// (private, mode 0600, NRM_XBORDER__PRIVATE_KEY_FILE) and DIR/CC.pub
    /// (for the partners' NRM_XBORDER__PARTNERS).
    Keygen(KeygenArgs),
    /// Make TLS for a leaf-node link: the link CA (once), a hub (server)
    /// certificate and a leaf (client) certificate signed by it.
    Tls(TlsArgs),
}

/// `xborder keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The country (ISO 3166-1 alpha-2, for example kg).
    #[arg(long, value_name = "CC")]
    pub country: String,
    /// Where to write CC.key and CC.pub (created when missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Replace an existing key pair (the partners then need the new CC.pub,
    /// and what was sealed to the old key no longer opens).
    #[arg(long)]
    pub force: bool,
}

/// `xborder tls`.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Where to write the certificates and keys (created when missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The link's name (for example ru-kg): NAME-hub.pem/.key and NAME-leaf.pem/.key.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: String,
    /// Where the link CA is (ca.pem, ca.key): made there when missing, used
    /// when present. Default: DIR.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// A further name or IP address of the hub, beside 127.0.0.1 and localhost.
    #[arg(long, value_name = "NAME_OR_IP")]
    pub san: Vec<String>,
    /// Make the link's certificates again even when they exist (the CA is kept).
    #[arg(long)]
    pub force: bool,
}

fn parse_name(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(s.to_owned())
    } else {
        Err("must be 1-64 letters, digits, '-' or '_'".into())
    }
}

/// Runs an `xborder` command.
///
/// # Errors
/// When a file exists that must not be replaced, or cannot be written.
pub fn run(command: XborderCommand) -> anyhow::Result<()> {
    match command {
        XborderCommand::Keygen(args) => {
            for path in keygen(&args)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        XborderCommand::Tls(args) => {
            for (written, path) in tls(&args)? {
                println!("{} {}", if written { "wrote" } else { "kept" }, path.display());
            }
            Ok(())
        }
    }
}

/// Writes `DIR/CC.key` and `DIR/CC.pub`; returns their paths.
///
/// # Errors
/// When the country code is malformed, a file of the pair exists and
/// `--force` is not given, or a file cannot be written.
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<Vec<PathBuf>> {
    let country =
        CountryCode::parse("--country", &args.country).map_err(|v| anyhow::anyhow!("{} {}", v.field, v.description))?;
    let private = args.dir.join(format!("{country}.key"));
    let public = args.dir.join(format!("{country}.pub"));
    if !args.force {
        for path in [&private, &public] {
            if path.exists() {
                bail!(
                    "{} exists: pass --force to replace the key pair (the partners then need the new {country}.pub, and what was sealed to the old key no longer opens)",
                    path.display()
                );
            }
        }
    }
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let key = CountryKey::generate();
    write_file(&private, &format!("{}\n", key.to_base64().expose_secret()), 0o600)?;
    write_file(&public, &format!("{}\n", key.public().to_base64()), 0o644)?;
    eprintln!(
        "{country}: key id {}; keep {} in {country} only, give {} to the partners",
        key.key_id(),
        private.display(),
        public.display()
    );
    Ok(vec![private, public])
}

/// The link CA's distinguished name: fixed, so that a CA made earlier signs
/// again from its key alone.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Köpür");
    params
        .distinguished_name
        .push(DnType::CommonName, "Köpür cross-border link CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    Ok(params)
}

/// Makes the link CA (when missing) and the link's hub and leaf
/// certificates; returns each file with whether it was written (or kept).
///
/// # Errors
/// When the CA's key cannot be read, or a file cannot be written.
pub fn tls(args: &TlsArgs) -> anyhow::Result<Vec<(bool, PathBuf)>> {
    let ca_dir = args.ca_dir.clone().unwrap_or_else(|| args.dir.clone());
    let ca_cert = ca_dir.join("ca.pem");
    let ca_key = ca_dir.join("ca.key");
    let mut files = Vec::new();
    let issuer = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            let pem = fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
            let key = KeyPair::from_pem(&pem)
                .map_err(|_| anyhow::anyhow!("{} is not a PEM private key", ca_key.display()))?;
            files.push((false, ca_cert.clone()));
            files.push((false, ca_key.clone()));
            Issuer::new(ca_params()?, key)
        }
        (false, false) => {
            fs::create_dir_all(&ca_dir).with_context(|| format!("creating {}", ca_dir.display()))?;
            let key = KeyPair::generate()?;
            let params = ca_params()?;
            let cert = params.self_signed(&key)?;
            write_file(&ca_key, &key.serialize_pem(), 0o600)?;
            write_file(&ca_cert, &cert.pem(), 0o644)?;
            files.push((true, ca_cert.clone()));
            files.push((true, ca_key.clone()));
            Issuer::new(params, key)
        }
        _ => bail!(
            "{} holds only one of ca.pem and ca.key: restore the other, or remove both to make a new link CA",
            ca_dir.display()
        ),
    };
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    for (role, server) in [("hub", true), ("leaf", false)] {
        let cert_path = args.dir.join(format!("{}-{role}.pem", args.name));
        let key_path = args.dir.join(format!("{}-{role}.key", args.name));
        if !args.force && cert_path.exists() && key_path.exists() {
            files.push((false, cert_path));
            files.push((false, key_path));
            continue;
        }
        let names: Vec<String> = if server {
            ["127.0.0.1".to_owned(), "localhost".to_owned()]
                .into_iter()
                .chain(args.san.iter().cloned())
                .collect()
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Köpür");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{}-{role}", args.name));
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(825);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        write_file(&cert_path, &cert.pem(), 0o644)?;
        files.push((true, cert_path));
        files.push((true, key_path));
    }
    Ok(files)
}

/// Writes `text` to `path` with `mode`, through a temporary file renamed
/// into place: a reader never sees half a key, and a private key is never
/// readable by others, not even for a moment.
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(mode);
    #[cfg(not(unix))]
    let _ = mode;
    let write = |tmp: &Path| -> std::io::Result<()> {
        let mut file = options.open(tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(tmp, path)
    };
    let result = write(&tmp);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use nrm_kernel::xborder::PartnerKey;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("nrmctl-xborder-{}", uuid::Uuid::now_v7()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn keygen_args(dir: &Path, force: bool) -> KeygenArgs {
        KeygenArgs {
            country: "KG".into(),
            dir: dir.to_owned(),
            force,
        }
    }

    #[test]
    fn keygen_writes_a_private_key_only_its_owner_reads_and_the_public_key() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("keys");
        let written = keygen(&keygen_args(&dir, false)).unwrap();
        assert_eq!(written, vec![dir.join("kg.key"), dir.join("kg.pub")]);
        #[cfg(unix)]
        assert_eq!(mode(&dir.join("kg.key")), 0o600);
        let key = CountryKey::load(&dir.join("kg.key")).unwrap();
        let public = PartnerKey::load(&dir.join("kg.pub")).unwrap();
        assert_eq!(key.public(), &public);
        // What is sealed to the .pub opens with the .key.
        let sealed = nrm_kernel::xborder::seal(&key, &public, b"aad", b"hello");
        assert_eq!(
            nrm_kernel::xborder::open(&key, key.public(), b"aad", &sealed).unwrap(),
            b"hello"
        );
    }

    #[test]
    fn keygen_refuses_to_replace_a_key_unless_forced() {
        let tmp = TempDir::new();
        keygen(&keygen_args(&tmp.0, false)).unwrap();
        let before = fs::read_to_string(tmp.0.join("kg.key")).unwrap();
        let err = keygen(&keygen_args(&tmp.0, false)).unwrap_err().to_string();
        assert!(err.contains("kg.key exists") && err.contains("--force"), "{err}");
        assert_eq!(fs::read_to_string(tmp.0.join("kg.key")).unwrap(), before);
        keygen(&keygen_args(&tmp.0, true)).unwrap();
        assert_ne!(fs::read_to_string(tmp.0.join("kg.key")).unwrap(), before);
        #[cfg(unix)]
        assert_eq!(mode(&tmp.0.join("kg.key")), 0o600);
    }

    #[test]
    fn keygen_refuses_a_malformed_country() {
        let tmp = TempDir::new();
        let mut args = keygen_args(&tmp.0, false);
        args.country = "kgz".into();
        assert!(keygen(&args).unwrap_err().to_string().contains("--country"));
    }

    fn tls_args(dir: &Path, ca_dir: Option<PathBuf>) -> TlsArgs {
        TlsArgs {
            dir: dir.to_owned(),
            name: "ru-kg".into(),
            ca_dir,
            san: vec!["nats.ru.example".into()],
            force: false,
        }
    }

    fn der(path: &Path) -> Vec<u8> {
        let text = fs::read_to_string(path).unwrap();
        pem::parse(text).unwrap().into_contents()
    }

    /// Verifies `leaf` against the CA in `ca` for `usage` with webpki.
    fn verify(ca: &Path, leaf: &Path, usage: webpki::KeyUsage) -> Result<(), webpki::Error> {
        use rustls_pki_types::{CertificateDer, UnixTime};
        let ca_der = CertificateDer::from(der(ca));
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap().to_owned();
        let leaf_der = CertificateDer::from(der(leaf));
        let cert = webpki::EndEntityCert::try_from(&leaf_der)?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn tls_makes_a_ca_once_and_certificates_that_chain_to_it() {
        use rustls_pki_types::ServerName;
        let tmp = TempDir::new();
        let written = tls(&tls_args(&tmp.0, None)).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|(w, p)| (*w, p.file_name().unwrap().to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            names,
            [
                (true, "ca.pem".to_owned()),
                (true, "ca.key".to_owned()),
                (true, "ru-kg-hub.pem".to_owned()),
                (true, "ru-kg-hub.key".to_owned()),
                (true, "ru-kg-leaf.pem".to_owned()),
                (true, "ru-kg-leaf.key".to_owned()),
            ]
        );
        #[cfg(unix)]
        for key in ["ca.key", "ru-kg-hub.key", "ru-kg-leaf.key"] {
            assert_eq!(mode(&tmp.0.join(key)), 0o600, "{key}");
        }
        let ca = tmp.0.join("ca.pem");
        let hub = tmp.0.join("ru-kg-hub.pem");
        let leaf = tmp.0.join("ru-kg-leaf.pem");
        verify(&ca, &hub, webpki::KeyUsage::server_auth()).unwrap();
        verify(&ca, &leaf, webpki::KeyUsage::client_auth()).unwrap();
        // The hub is a server, the leaf a client, not the other way round.
        assert!(verify(&ca, &hub, webpki::KeyUsage::client_auth()).is_err());
        assert!(verify(&ca, &leaf, webpki::KeyUsage::server_auth()).is_err());
        let hub_der = rustls_pki_types::CertificateDer::from(der(&hub));
        let hub_cert = webpki::EndEntityCert::try_from(&hub_der).unwrap();
        for name in ["127.0.0.1", "localhost", "nats.ru.example"] {
            let name = ServerName::try_from(name).unwrap();
            hub_cert.verify_is_valid_for_subject_name(&name).unwrap();
        }
        assert!(
            hub_cert
                .verify_is_valid_for_subject_name(&ServerName::try_from("10.1.2.3").unwrap())
                .is_err()
        );

        // A second link with the same CA: the CA is kept and signs again.
        let ca_before = fs::read(&ca).unwrap();
        let other = tmp.0.join("tj");
        let again = tls(&TlsArgs {
            name: "ru-tj".into(),
            ..tls_args(&other, Some(tmp.0.clone()))
        })
        .unwrap();
        assert_eq!(again[0], (false, ca.clone()));
        assert_eq!(fs::read(&ca).unwrap(), ca_before);
        verify(&ca, &other.join("ru-tj-hub.pem"), webpki::KeyUsage::server_auth()).unwrap();
        verify(&ca, &other.join("ru-tj-leaf.pem"), webpki::KeyUsage::client_auth()).unwrap();

        // Run again: everything kept.
        let kept = tls(&tls_args(&tmp.0, None)).unwrap();
        assert!(kept.iter().all(|(w, _)| !w), "{kept:?}");
    }

    #[test]
    fn a_certificate_of_another_ca_does_not_chain() {
        let a = TempDir::new();
        let b = TempDir::new();
        tls(&tls_args(&a.0, None)).unwrap();
        tls(&tls_args(&b.0, None)).unwrap();
        assert!(
            verify(
                &a.0.join("ca.pem"),
                &b.0.join("ru-kg-hub.pem"),
                webpki::KeyUsage::server_auth()
            )
            .is_err()
        );
    }
}
