//! The interception CA and the leaf certificates the daemon presents to agents.
//!
//! `portcullis ca init` creates the CA once in the state directory (key 0600, never
//! logged). The daemon then mints, on demand, a leaf for what the agent asked for: the
//! TLS server name (SNI) and the original destination IP the kernel recorded, plus the
//! names the in-cluster API is always reached by and any configured names. Leaves are
//! cached per (name, IP) and re-minted before they expire.
use std::{
    collections::HashMap,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ServerConfig, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Names agents use for the in-cluster API server, always in every leaf.
pub const KUBERNETES_NAMES: &[&str] = &[
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// How long a minted leaf is valid, and when the cache re-mints it.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const LEAF_REMINT_AFTER: Duration = Duration::from_secs(12 * 3600);
/// SNI is chosen by the agent: bound the cache so it cannot grow without limit.
const LEAF_CACHE_MAX: usize = 1024;
const CA_VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("no interception CA in {dir}: run `portcullis ca init --config FILE` first ({source})")]
    Missing {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the interception CA in {dir} is unusable: {what}")]
    Invalid { dir: PathBuf, what: String },
    #[error("minting a certificate for {names:?}: {reason}")]
    Mint { names: Vec<String>, reason: String },
}

/// Where the CA lives under the state directory.
#[derive(Debug, Clone)]
pub struct CaPaths {
    pub dir: PathBuf,
}

impl CaPaths {
    /// The CA in `dir` (the state directory's `ca`).
    pub fn new(dir: &Path) -> Self {
        CaPaths {
            dir: dir.to_owned(),
        }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
}

/// Result of `ca init`.
pub struct InitOutcome {
    pub created: bool,
    pub cert_path: PathBuf,
}

/// Creates the CA unless one exists (then it is kept: agents already trust it).
pub fn init(paths: &CaPaths) -> Result<InitOutcome, CaError> {
    let cert_path = paths.cert();
    if cert_path.exists() && paths.key().exists() {
        // Prove it loads before saying it is fine.
        load_issuer(paths)?;
        return Ok(InitOutcome {
            created: false,
            cert_path,
        });
    }
    std::fs::create_dir_all(&paths.dir).map_err(|source| CaError::Write {
        path: paths.dir.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700));
    let key = KeyPair::generate().map_err(|e| mint_err(&["CA"], e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Portcullis interception CA");
    dn.push(DnType::OrganizationName, "Portcullis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(|e| mint_err(&["CA"], e))?;
    // Key first, created 0600 from the start (never briefly world-readable).
    write_file(&paths.key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(InitOutcome {
        created: true,
        cert_path,
    })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let werr = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

fn mint_err(names: &[&str], e: rcgen::Error) -> CaError {
    CaError::Mint {
        names: names.iter().map(|s| s.to_string()).collect(),
        reason: e.to_string(),
    }
}

fn load_issuer(
    paths: &CaPaths,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), CaError> {
    let missing = |source| CaError::Missing {
        dir: paths.dir.clone(),
        source,
    };
    let invalid = |what: String| CaError::Invalid {
        dir: paths.dir.clone(),
        what,
    };
    let cert_pem = std::fs::read_to_string(paths.cert()).map_err(missing)?;
    let key_meta = std::fs::metadata(paths.key()).map_err(missing)?;
    if key_meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            paths.key().display(),
            key_meta.permissions().mode() & 0o777
        )));
    }
    let key_pem = std::fs::read_to_string(paths.key()).map_err(missing)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("ca.key: {e}")))?;
    let der = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("ca.crt: {e}")))?
    };
    let issuer =
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(format!("ca.crt: {e}")))?;
    Ok((issuer, der.into_owned()))
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct LeafKey {
    sni: Option<String>,
    ip: Option<IpAddr>,
}

struct Cached {
    config: Arc<ServerConfig>,
    minted: Instant,
}

/// Mints and caches the TLS server configurations agents are served with.
pub struct LeafMinter {
    /// The issuing CA (the interception CA, or this node's intermediate) and its
    /// certificate, served after each leaf; replaced when a renewed one is loaded.
    issuer: std::sync::RwLock<(Issuer<'static, KeyPair>, CertificateDer<'static>)>,
    /// One key for every leaf of this daemon run; only the certificate differs.
    leaf_key: KeyPair,
    extra_names: Vec<String>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<HashMap<LeafKey, Cached>>,
}

impl LeafMinter {
    pub fn load(paths: &CaPaths, extra_names: Vec<String>) -> Result<Self, CaError> {
        let issuer = load_issuer(paths)?;
        let leaf_key = KeyPair::generate().map_err(|e| mint_err(&["leaf key"], e))?;
        Ok(LeafMinter {
            issuer: std::sync::RwLock::new(issuer),
            leaf_key,
            extra_names,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Loads the CA in `paths` again (a renewed intermediate); leaves minted from now
    /// on chain to it.
    pub fn reload(&self, paths: &CaPaths) -> Result<(), CaError> {
        let issuer = load_issuer(paths)?;
        *self.issuer.write().unwrap_or_else(|p| p.into_inner()) = issuer;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// The server configuration for a connection that asked for `sni` and was going to
    /// `ip` (the original destination, from the kernel).
    pub fn server_config(
        &self,
        sni: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Arc<ServerConfig>, CaError> {
        let key = LeafKey {
            sni: sni.map(|s| s.to_ascii_lowercase()),
            ip,
        };
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&key)
                && c.minted.elapsed() < LEAF_REMINT_AFTER
            {
                return Ok(c.config.clone());
            }
        }
        let config = Arc::new(self.mint(&key)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= LEAF_CACHE_MAX {
            cache.retain(|_, c| c.minted.elapsed() < LEAF_REMINT_AFTER);
            if cache.len() >= LEAF_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                config: config.clone(),
                minted: Instant::now(),
            },
        );
        Ok(config)
    }

    fn mint(&self, key: &LeafKey) -> Result<ServerConfig, CaError> {
        let mut names: Vec<String> = KUBERNETES_NAMES.iter().map(|s| s.to_string()).collect();
        for n in self.extra_names.iter().chain(key.sni.iter()) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let merr = |e: String| CaError::Mint {
            names: names.clone(),
            reason: e,
        };
        let mut sans = Vec::with_capacity(names.len() + 1);
        for n in &names {
            // A name that parses as an IP belongs in an IP SAN.
            match n.parse::<IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .map_err(|e: rcgen::Error| merr(e.to_string()))?,
                )),
            }
        }
        if let Some(ip) = key.ip
            && !sans.contains(&SanType::IpAddress(ip))
        {
            sans.push(SanType::IpAddress(ip));
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            key.sni.clone().unwrap_or_else(|| "kubernetes".into()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::try_from(LEAF_VALIDITY).unwrap_or_default();
        let (cert, ca_der) = {
            let guard = self.issuer.read().unwrap_or_else(|p| p.into_inner());
            let cert = params
                .signed_by(&self.leaf_key, &guard.0)
                .map_err(|e| merr(e.to_string()))?;
            (cert, guard.1.clone())
        };
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| merr(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), ca_der], key_der)
            .map_err(|e| merr(e.to_string()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pc-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_is_idempotent_and_the_key_is_private() {
        let d = tmpdir("init");
        let paths = CaPaths::new(&d);
        let first = init(&paths).expect("init");
        assert!(first.created);
        let mode = std::fs::metadata(paths.key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read(paths.cert()).unwrap();
        let second = init(&paths).expect("second init");
        assert!(!second.created, "an existing CA is kept");
        assert_eq!(before, std::fs::read(paths.cert()).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let d = tmpdir("mode");
        let paths = CaPaths::new(&d);
        init(&paths).unwrap();
        std::fs::set_permissions(paths.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LeafMinter::load(&paths, vec![])
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn leaves_are_cached_per_name_and_ip() {
        let d = tmpdir("leaf");
        let paths = CaPaths::new(&d);
        init(&paths).unwrap();
        let m = LeafMinter::load(&paths, vec!["api.example.test".into()]).unwrap();
        let ip: IpAddr = "10.96.0.1".parse().unwrap();
        let a = m
            .server_config(Some("kubernetes.default"), Some(ip))
            .unwrap();
        let b = m
            .server_config(Some("KUBERNETES.default"), Some(ip))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b), "same name and IP: cached");
        let c = m.server_config(None, Some(ip)).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
