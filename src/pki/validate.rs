//! Deciding whether parsed [`Material`] may be written, and rendering the Secret data and facts.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::sign::{CertifiedKey, SigningKey};
use sha2::{Digest, Sha256};
use webpki::{KeyPurposeId, KeyPurposeIdIter, KeyUsage, RequiredEkuNotFoundContext};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::pem;
use super::{CertificateFacts, Material, PkiError, ValidatedIdentity, rfc3339};

const CHAIN: &str = "certificate chain";
const CA: &str = "CA certificates";

// id-kp-clientAuth and anyExtendedKeyUsage (DER content bytes).
const EKU_CLIENT_AUTH: &[u8] = &x509_parser::asn1_rs::oid!(raw 1.3.6.1.5.5.7.3.2);
const EKU_ANY: &[u8] = &x509_parser::asn1_rs::oid!(raw 2.5.29.37.0);

/// Run every check, in the order a person would fix them: parse, key, validity window, EKU, chain.
pub fn validate(material: &Material, now_unix: i64) -> Result<ValidatedIdentity, PkiError> {
    let (leaf_der, intermediates) =
        material
            .chain
            .split_first()
            .ok_or_else(|| PkiError::MissingCertificate {
                origin: CHAIN.to_owned(),
            })?;
    let leaf = parse_cert(leaf_der, CHAIN, 1)?;
    let parsed_intermediates = intermediates
        .iter()
        .enumerate()
        .map(|(i, der)| parse_cert(der, CHAIN, i + 2))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, der) in material.ca.iter().enumerate() {
        parse_cert(der, CA, i + 1)?;
    }

    load_matching_key(material, &leaf)?;

    check_validity(&leaf, "leaf certificate", now_unix)?;
    check_client_auth(&leaf)?;
    verify_chain(
        material,
        leaf_der,
        intermediates,
        &parsed_intermediates,
        now_unix,
    )?;

    let facts = facts(&leaf, leaf_der);
    let tls_crt = material
        .chain
        .iter()
        .map(|c| pem::encode("CERTIFICATE", c))
        .collect::<String>();
    let ca_crt = (!material.ca.is_empty()).then(|| {
        material
            .ca
            .iter()
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect::<String>()
    });
    Ok(ValidatedIdentity {
        facts,
        tls_crt,
        tls_key: material.key.to_pem(),
        ca_crt,
    })
}

/// A rustls [`CertifiedKey`] (chain + signing key) for the egress proxy, after the key-match check.
/// Does not check time, EKU or chain: call [`validate`] for that.
pub fn certified_key(material: &Material) -> Result<Arc<CertifiedKey>, PkiError> {
    let leaf_der = material
        .chain
        .first()
        .ok_or_else(|| PkiError::MissingCertificate {
            origin: CHAIN.to_owned(),
        })?;
    let leaf = parse_cert(leaf_der, CHAIN, 1)?;
    let signing_key = load_matching_key(material, &leaf)?;
    Ok(Arc::new(CertifiedKey::new(
        material.chain.clone(),
        signing_key,
    )))
}

fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    origin: &str,
    position: usize,
) -> Result<X509Certificate<'a>, PkiError> {
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, cert)) => Ok(cert),
        Err(_) => Err(PkiError::invalid_pem(
            origin,
            format!("certificate {position}: DER does not parse as an X.509 certificate"),
        )),
    }
}

/// Load the key (type check included) and compare its public key with the leaf's.
fn load_matching_key(
    material: &Material,
    leaf: &X509Certificate<'_>,
) -> Result<Arc<dyn SigningKey>, PkiError> {
    let (kind, signing_key) = material.key.load()?;
    let mismatch = || PkiError::KeyMismatch {
        subject: leaf.subject().to_string(),
    };
    let Some(key_spki_der) = signing_key.public_key() else {
        return Err(PkiError::UnsupportedKey {
            origin: material.key.origin().to_owned(),
            detail: format!("{}: public key cannot be derived", kind.name()),
        });
    };
    let Ok((_, key_spki)) = SubjectPublicKeyInfo::from_der(key_spki_der.as_ref()) else {
        return Err(mismatch());
    };
    let cert_spki = leaf.public_key();
    // Compare algorithm and key bits rather than whole SPKI bytes: encoders differ on optional NULLs.
    if key_spki.algorithm.algorithm != cert_spki.algorithm.algorithm
        || key_spki.subject_public_key.data != cert_spki.subject_public_key.data
    {
        return Err(mismatch());
    }
    Ok(signing_key)
}

fn check_validity(cert: &X509Certificate<'_>, which: &str, now: i64) -> Result<(), PkiError> {
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let which = format!("{which} \"{}\"", cert.subject());
    if now < not_before {
        return Err(PkiError::NotYetValid {
            which,
            not_before: rfc3339(not_before),
            now: rfc3339(now),
        });
    }
    // notAfter is inclusive (RFC 5280 4.1.2.5).
    if now > not_after {
        return Err(PkiError::Expired {
            which,
            not_after: rfc3339(not_after),
            now: rfc3339(now),
        });
    }
    Ok(())
}

/// No EKU extension means "any purpose"; otherwise clientAuth or anyExtendedKeyUsage must be listed.
fn check_client_auth(leaf: &X509Certificate<'_>) -> Result<(), PkiError> {
    let eku = leaf.extended_key_usage().map_err(|_| {
        PkiError::invalid_pem(
            "leaf certificate",
            "the Extended Key Usage extension appears more than once",
        )
    })?;
    let Some(eku) = eku else {
        return Ok(());
    };
    let eku = eku.value;
    if eku.client_auth || eku.any {
        return Ok(());
    }
    let mut present: Vec<String> = Vec::new();
    for (set, name) in [
        (eku.server_auth, "serverAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ] {
        if set {
            present.push(name.to_owned());
        }
    }
    present.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    let present = if present.is_empty() {
        "nothing".to_owned()
    } else {
        present.join(", ")
    };
    Err(PkiError::MissingClientAuth { present })
}

/// With CA certificates: the chain must lead to one of them. Without: the certificates in the chain must
/// at least link up (leaf signed by the next one, and so on), with the last one taken as the anchor.
fn verify_chain(
    material: &Material,
    leaf_der: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    parsed_intermediates: &[X509Certificate<'_>],
    now: i64,
) -> Result<(), PkiError> {
    let with_ca = !material.ca.is_empty();
    let (anchor_ders, path): (&[CertificateDer<'static>], &[CertificateDer<'static>]) = if with_ca {
        (&material.ca, intermediates)
    } else {
        match intermediates.split_last() {
            Some((last, middle)) => (std::slice::from_ref(last), middle),
            None => return Ok(()),
        }
    };
    let chain_invalid = |detail: String| PkiError::ChainInvalid { detail };

    let anchors = anchor_ders
        .iter()
        .enumerate()
        .map(|(i, der)| {
            webpki::anchor_from_trusted_cert(der).map_err(|e| {
                chain_invalid(format!(
                    "{} certificate {} cannot be used as a trust anchor ({e})",
                    if with_ca { "CA" } else { "chain" },
                    i + 1
                ))
            })
        })
        .collect::<Result<Vec<TrustAnchor<'_>>, _>>()?;
    let end_entity = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| chain_invalid(format!("the leaf certificate is not acceptable ({e})")))?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));

    let result = end_entity.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        path,
        time,
        ClientAuthOrAny,
        None,
        None,
    );
    let Err(error) = result else {
        return Ok(());
    };

    // Expiry of an intermediate deserves its own reason; find which one.
    if matches!(
        error,
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. }
    ) {
        for (i, cert) in parsed_intermediates.iter().enumerate() {
            check_validity(cert, &format!("intermediate certificate {}", i + 1), now)?;
        }
    }
    let detail = describe(&error);
    let detail = if with_ca {
        match error {
            webpki::Error::InvalidSignatureForPublicKey => {
                format!("{detail} (is the CA re-issued with the same name but a different key?)")
            }
            webpki::Error::UnknownIssuer => {
                let top_issuer = parsed_intermediates
                    .last()
                    .map(|c| c.issuer().to_string())
                    .or_else(|| {
                        x509_parser::parse_x509_certificate(leaf_der.as_ref())
                            .ok()
                            .map(|(_, c)| c.issuer().to_string())
                    })
                    .unwrap_or_default();
                let ca_subjects = material
                    .ca
                    .iter()
                    .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
                    .map(|(_, c)| format!("\"{}\"", c.subject()))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "{detail}: the chain ends at issuer \"{top_issuer}\" but the CA holds {ca_subjects}"
                )
            }
            _ => detail,
        }
    } else {
        format!("the certificates in the certificate value do not form a chain: {detail}")
    };
    Err(chain_invalid(detail))
}

/// Short, person-readable words for webpki's errors.
fn describe(error: &webpki::Error) -> String {
    use webpki::Error as E;
    match error {
        E::UnknownIssuer => "no CA certificate issued the chain (unknown issuer)".to_owned(),
        E::InvalidSignatureForPublicKey => "a signature in the chain does not verify".to_owned(),
        E::CertExpired { .. } => "a certificate in the chain has expired".to_owned(),
        E::CertNotValidYet { .. } => "a certificate in the chain is not valid yet".to_owned(),
        E::CaUsedAsEndEntity => "the leaf certificate is a CA certificate".to_owned(),
        E::EndEntityUsedAsCa => {
            "an intermediate is not a CA certificate (basicConstraints)".to_owned()
        }
        E::RequiredEkuNotFoundContext(_) => {
            "an intermediate's Extended Key Usage does not allow clientAuth".to_owned()
        }
        E::PathLenConstraintViolated => "a pathLenConstraint is violated".to_owned(),
        E::NameConstraintViolation => "a name constraint is violated".to_owned(),
        E::UnsupportedCriticalExtension => {
            "a certificate has an unsupported critical extension".to_owned()
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "a certificate uses an unsupported signature algorithm".to_owned()
        }
        other => format!("{other}"),
    }
}

/// webpki's client-auth usage, but also accepting anyExtendedKeyUsage, matching [`check_client_auth`].
struct ClientAuthOrAny;

impl webpki::ExtendedKeyUsageValidator for ClientAuthOrAny {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == KeyPurposeId::new(EKU_CLIENT_AUTH) || id == KeyPurposeId::new(EKU_ANY) {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            RequiredEkuNotFoundContext {
                required: KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

/// The facts of one certificate and its extended key usages by name, whether or not it would
/// pass validation (for `mtls-operator check`); `None` if it does not parse.
pub fn certificate_facts(der: &CertificateDer<'_>) -> Option<(CertificateFacts, Vec<String>)> {
    let (_, certificate) = X509Certificate::from_der(der.as_ref()).ok()?;
    let usages = match certificate.extended_key_usage() {
        Ok(Some(eku)) => {
            let eku = eku.value;
            let mut names: Vec<String> = [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(present, _)| *present)
            .map(|(_, name)| name.to_string())
            .collect();
            names.extend(eku.other.iter().map(|oid| oid.to_id_string()));
            names
        }
        // No extension: any purpose.
        _ => Vec::new(),
    };
    Some((facts(&certificate, der), usages))
}

fn facts(leaf: &X509Certificate<'_>, leaf_der: &CertificateDer<'_>) -> CertificateFacts {
    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    CertificateFacts {
        subject: leaf.subject().to_string(),
        issuer: leaf.issuer().to_string(),
        serial_number: serial_hex(leaf.raw_serial()),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        sha256_fingerprint: hex::encode(Sha256::digest(leaf_der.as_ref())),
        dns_names,
        uris,
    }
}

/// Serial as OpenSSL prints it (even-length hex, sign byte dropped), lower-case and without colons.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(raw.get(start..).unwrap_or(raw))
}
