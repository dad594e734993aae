//! Certificates made for a cluster install: the interception CA, name-constrained
//! to the API server's names and addresses (a stolen key cannot vouch for any other
//! site), and the admission webhook's own serving pair.
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};

use super::ca::KUBERNETES_NAMES;

#[derive(Debug, thiserror::Error)]
#[error("making {what}: {source}")]
pub struct IssueError {
    what: &'static str,
    #[source]
    source: rcgen::Error,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, "Portcullis");
    d
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

/// The interception CA for a cluster: it may only certify the API server's names
/// (the in-cluster ones and `extra_names`) and `ips` (the Service ClusterIP, the API
/// servers' addresses). Path length 1: nodes serve from their own intermediates.
pub fn interception_ca(extra_names: &[String], ips: &[IpAddr]) -> Result<Pair, IssueError> {
    let err = |source| IssueError {
        what: "the interception CA",
        source,
    };
    let key = KeyPair::generate().map_err(err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("Portcullis interception CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut permitted: Vec<GeneralSubtree> = KUBERNETES_NAMES
        .iter()
        .map(|n| GeneralSubtree::DnsName((*n).to_string()))
        .chain(extra_names.iter().cloned().map(GeneralSubtree::DnsName))
        .collect();
    for ip in ips {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        permitted.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
            *ip, prefix,
        )));
    }
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: vec![],
    });
    validity(&mut p, 3650);
    let cert = p.self_signed(&key).map_err(err)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The webhook's serving pair: its own small CA (the `caBundle` of the webhook
/// configurations) and a leaf for the Service's DNS names. Returns (ca, leaf).
pub fn webhook_serving(dns_names: &[String]) -> Result<(Pair, Pair), IssueError> {
    let err = |source| IssueError {
        what: "the webhook's serving certificate",
        source,
    };
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("Portcullis webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    validity(&mut ca, 3650);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = dn(dns_names.first().map(String::as_str).unwrap_or("webhook"));
    leaf.subject_alt_names = dns_names
        .iter()
        .filter_map(|n| n.clone().try_into().ok().map(SanType::DnsName))
        .collect();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut leaf, 3650);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    Ok((
        Pair {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        },
        Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    ))
}

/// A node's own key and its request for an intermediate (PEM key, PEM CSR). The key
/// never leaves the node.
pub fn node_request(node: &str) -> Result<(String, String), IssueError> {
    let err = |source| IssueError {
        what: "the node's intermediate request",
        source,
    };
    let key = KeyPair::generate().map_err(err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&format!("Portcullis node {node}"));
    let csr = p.serialize_request(&key).map_err(err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(err)?))
}

/// The intermediate CA for `node`, from its request (only the public key is taken),
/// signed by the interception CA: path length 0, valid for `validity`.
pub fn node_intermediate(
    root_cert_pem: &str,
    root_key_pem: &str,
    csr_pem: &str,
    node: &str,
    validity: std::time::Duration,
) -> Result<String, IssueError> {
    let err = |source| IssueError {
        what: "a node's intermediate CA",
        source,
    };
    let root_key = KeyPair::from_pem(root_key_pem).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(root_cert_pem, root_key).map_err(err)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&format!("Portcullis node {node}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::try_from(validity).unwrap_or(time::Duration::hours(24));
    csr.params = p;
    Ok(csr.signed_by(&issuer).map_err(err)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interception_ca_carries_its_constraints() {
        let p =
            interception_ca(&["api.example.com".into()], &["10.96.0.1".parse().unwrap()]).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(p.cert_pem.as_bytes());
        use rustls_pki_types::pem::PemObject;
        let der = der.unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let nc = x.name_constraints().unwrap().unwrap().value;
        let permitted = nc.permitted_subtrees.as_ref().unwrap();
        assert_eq!(permitted.len(), KUBERNETES_NAMES.len() + 2);
        // A node's intermediate: its own key, signed by the root, path length 0.
        let root_key = p.key_pem.clone();
        let (node_key, csr) = node_request("n1").unwrap();
        let inter = node_intermediate(
            &p.cert_pem,
            &root_key,
            &csr,
            "n1",
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let ider = rustls_pki_types::CertificateDer::from_pem_slice(inter.as_bytes()).unwrap();
        let (_, ix) = x509_parser::parse_x509_certificate(&ider).unwrap();
        assert!(ix.subject().to_string().contains("Portcullis node n1"));
        assert!(
            ix.issuer()
                .to_string()
                .contains("Portcullis interception CA")
        );
        let life = ix.validity().not_after.timestamp() - ix.validity().not_before.timestamp();
        assert!(life <= 3600 + 300, "{life}");
        let bc = ix.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));
        assert!(node_key.contains("PRIVATE KEY"));
        let (ca, leaf) = webhook_serving(&["w.ns.svc".into()]).unwrap();
        assert!(ca.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
    }
}
