//! The node's PKI, generated per run with rcgen: one cluster CA, serving certificates
//! for the apiserver and the kubelet, client certificates for every component (with
//! the names RBAC's bootstrap bindings expect), and the service-account signing key.
use std::{net::IpAddr, path::Path};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub ca_cert: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pair {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<()> {
        super::write(&dir.join(format!("{name}.crt")), &self.cert)?;
        super::write(&dir.join(format!("{name}.key")), &self.key)
    }
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(2);
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "portcullis test cluster CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        validity(&mut p);
        let cert = p.self_signed(&key)?;
        Ok(Pki {
            ca_cert: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    fn issue(
        &self,
        cn: &str,
        org: Option<&str>,
        names: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<Pair> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        if let Some(o) = org {
            dn.push(DnType::OrganizationName, o);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*n).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        validity(&mut p);
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    pub fn server(&self, cn: &str, names: &[&str]) -> Result<Pair> {
        self.issue(cn, None, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate: CN is the user name, O the group.
    pub fn client(&self, user: &str, group: Option<&str>) -> Result<Pair> {
        self.issue(user, group, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}
