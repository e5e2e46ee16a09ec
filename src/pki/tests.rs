//! Unit tests: every certificate and key is generated here with rcgen; none is committed.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    SignatureAlgorithm,
};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::*;

// Fixed times so tests never depend on the clock.
const NOW: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z
const LEAF_NB: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z
const LEAF_NA: i64 = 1_900_000_000; // 2030-03-17T17:46:40Z
const CA_NB: i64 = 1_600_000_000;
const CA_NA: i64 = 2_000_000_000;

fn ts(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).expect("timestamp in range")
}

// ---------------------------------------------------------------------------------------------
// Key and certificate fixtures
// ---------------------------------------------------------------------------------------------

/// RSA generation is slow; generate one key per process and rebuild KeyPairs from it.
fn rsa_key() -> KeyPair {
    static PEM: OnceLock<String> = OnceLock::new();
    let pem = PEM.get_or_init(|| {
        KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .expect("rsa keygen")
            .serialize_pem()
    });
    KeyPair::from_pem(pem).expect("rsa key from pem")
}

fn gen_key(alg: &'static SignatureAlgorithm) -> KeyPair {
    if alg == &rcgen::PKCS_RSA_SHA256 {
        rsa_key()
    } else {
        KeyPair::generate_for(alg).expect("keygen")
    }
}

struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
    inter: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(cn: &str, nb: i64, na: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = ts(nb);
    params.not_after = ts(na);
    params
}

fn pki() -> Pki {
    pki_with_inter_window(CA_NB, CA_NA)
}

fn pki_with_inter_window(nb: i64, na: i64) -> Pki {
    let root = CertifiedIssuer::self_signed(
        ca_params("Test Root CA", CA_NB, CA_NA),
        gen_key(&rcgen::PKCS_ECDSA_P256_SHA256),
    )
    .expect("root");
    let inter = CertifiedIssuer::signed_by(
        ca_params("Test Intermediate CA", nb, na),
        gen_key(&rcgen::PKCS_ECDSA_P384_SHA384),
        &root,
    )
    .expect("intermediate");
    Pki { root, inter }
}

fn leaf_params() -> CertificateParams {
    let mut params = CertificateParams::new(vec!["client.example.com".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/ns/payments/sa/client"
            .try_into()
            .expect("uri"),
    ));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "payments-client");
    dn.push(DnType::OrganizationName, "Example");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = ts(LEAF_NB);
    params.not_after = ts(LEAF_NA);
    params.serial_number = Some(SerialNumber::from_slice(&[0x8f, 0x01, 0x02, 0x03]));
    params
}

/// A leaf signed by `issuer`, with `tweak` applied to the default parameters. Returns the DER.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    key: &KeyPair,
    tweak: impl FnOnce(&mut CertificateParams),
) -> Vec<u8> {
    let mut params = leaf_params();
    tweak(&mut params);
    params.signed_by(key, issuer).expect("leaf").der().to_vec()
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn cert_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

// --- A tiny DER toolkit, independent of the code under test, to re-encode keys ---------------

fn tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = if input[1] < 0x80 {
        (usize::from(input[1]), 2)
    } else {
        let n = usize::from(input[1] & 0x7f);
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

fn elements(mut content: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (tag, c, rest) = tlv(content);
        out.push((tag, c.to_vec()));
        content = rest;
    }
    out
}

fn enc(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn enc_all(parts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    parts.iter().flat_map(|(t, c)| enc(*t, c)).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Enc {
    Pkcs8,
    /// RSA only: the PKCS#8 privateKey OCTET STRING content is the PKCS#1 key.
    Pkcs1,
    /// EC only: the inner ECPrivateKey as found in PKCS#8 (no curve parameters).
    Sec1NoParams,
    /// EC only: ECPrivateKey with the named curve in `[0]`, as OpenSSL writes it.
    Sec1,
}

/// (PEM label, DER) of `key` in the requested encoding.
fn key_der(key: &KeyPair, encoding: Enc) -> (&'static str, Vec<u8>) {
    let pkcs8 = key.serialize_der();
    if encoding == Enc::Pkcs8 {
        return ("PRIVATE KEY", pkcs8);
    }
    let (_, outer, _) = tlv(&pkcs8);
    let parts = elements(outer);
    let alg_id = elements(&parts[1].1);
    let inner = parts[2].1.clone();
    match encoding {
        Enc::Pkcs1 => ("RSA PRIVATE KEY", inner),
        Enc::Sec1NoParams | Enc::Sec1 => {
            let curve_oid = enc(alg_id[1].0, &alg_id[1].1);
            let (_, ec_outer, _) = tlv(&inner);
            let mut ec = elements(ec_outer);
            ec.retain(|(t, _)| *t != 0xa0);
            if encoding == Enc::Sec1 {
                ec.insert(2, (0xa0, curve_oid));
            }
            ("EC PRIVATE KEY", enc(0x30, &enc_all(&ec)))
        }
        Enc::Pkcs8 => unreachable!(),
    }
}

fn key_pem(key: &KeyPair, encoding: Enc) -> String {
    let (label, der) = key_der(key, encoding);
    pem_block(label, &der)
}

fn json_value(cert: &str, key: &str, ca: Option<&str>) -> String {
    let mut value = json!({ "certificate": cert, "private_key": key });
    if let Some(ca) = ca {
        value["ca"] = json!(ca);
    }
    value.to_string()
}

fn fields() -> JsonFields {
    JsonFields::default()
}

/// A simple, valid identity: leaf (P-256) signed directly by the root; JSON with a CA.
struct Simple {
    pki: Pki,
    leaf_der: Vec<u8>,
    key: KeyPair,
}

fn simple() -> Simple {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.root, &key, |_| {});
    Simple { pki, leaf_der, key }
}

fn reason_of<T: std::fmt::Debug>(result: Result<T, PkiError>) -> crate::api::conditions::Reason {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.reason(),
    }
}

fn err_of<T: std::fmt::Debug>(result: Result<T, PkiError>) -> PkiError {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

fn parse_and_validate_json(text: &str) -> Result<ValidatedIdentity, PkiError> {
    validate(&parse_json(text, &fields())?, NOW)
}

fn pem_blocks_of(text: &str) -> Vec<(String, Vec<u8>)> {
    let blocks = pem::parse_blocks(text).expect("pem");
    blocks.into_iter().map(|b| (b.label, b.der)).collect()
}

// ---------------------------------------------------------------------------------------------
// Happy paths: every key type and encoding, both formats
// ---------------------------------------------------------------------------------------------

fn check_happy(alg: &'static SignatureAlgorithm, encoding: Enc) {
    let pki = pki();
    let key = gen_key(alg);
    let leaf_der = leaf(&pki.root, &key, |_| {});
    let kpem = key_pem(&key, encoding);
    let root_pem = cert_pem(pki.root.der());

    // Json format, with CA.
    let text = json_value(&cert_pem(&leaf_der), &kpem, Some(&root_pem));
    let material = parse_json(&text, &fields()).expect("parse json");
    let id = validate(&material, NOW).expect("validate json");
    assert_eq!(id.tls_crt, cert_pem(&leaf_der), "{alg:?} {encoding:?}");
    assert_eq!(
        id.tls_key.expose(),
        kpem,
        "tls.key keeps the original encoding"
    );
    assert_eq!(id.ca_crt.as_deref(), Some(root_pem.as_str()));
    assert_eq!(
        id.facts.sha256_fingerprint,
        hex::encode(Sha256::digest(&leaf_der))
    );

    // Pem format: key first, then leaf; CA from elsewhere.
    let bundle = format!("{kpem}{}", cert_pem(&leaf_der));
    let material = parse_pem_bundle(&bundle, Some(&root_pem)).expect("parse bundle");
    let id2 = validate(&material, NOW).expect("validate bundle");
    assert_eq!(id, id2);

    // rustls accepts the result as a client identity.
    let ck = certified_key(&material).expect("certified key");
    ck.keys_match().expect("rustls agrees the key matches");

    // cert-manager's extra formats: the key then the chain; the key as DER, in tls.key's encoding.
    assert_eq!(id.combined_pem(), format!("{kpem}{}", cert_pem(&leaf_der)));
    let (label, der) = pem_blocks_of(&kpem).remove(0);
    assert_eq!(id.key_der(), Some(der), "{label}");

    // PKCS#12 in both profiles, whatever the key's encoding: it reads back with the password, the
    // key entry under its alias with the leaf first and the CA last, the CA in the truststore.
    for profile in [
        super::keystore::Pkcs12Profile::Modern,
        super::keystore::Pkcs12Profile::Legacy,
    ] {
        let files = super::keystore::pkcs12(&id, "s3cret", "client", profile).expect("pkcs12");
        let policy = p12_keystore::Pkcs12ImportPolicy::Strict;
        let store =
            p12_keystore::KeyStore::from_pkcs12(&files.keystore, "s3cret", policy).expect("read");
        let (alias, chain) = store.private_key_chain().expect("a key entry");
        assert_eq!(alias, "client");
        assert_eq!(
            chain.certs().first().map(|c| c.as_der()),
            Some(leaf_der.as_slice())
        );
        assert_eq!(
            chain.certs().last().map(|c| c.as_der()),
            Some(pki.root.der().as_ref())
        );
        let truststore = files.truststore.expect("a truststore");
        let trusted = p12_keystore::KeyStore::from_pkcs12(&truststore, "s3cret", policy)
            .expect("read truststore");
        assert_eq!(trusted.entries_len(), 1);
        assert!(
            p12_keystore::KeyStore::from_pkcs12(&files.keystore, "wrong", policy).is_err(),
            "the password protects it"
        );
        // A PKCS#12 source reads back into the same material.
        let material = super::keystore::read_pkcs12(&files.keystore, "s3cret").expect("read");
        let again = validate(&material, NOW).expect("validate the PKCS#12 source");
        assert_eq!(again.facts, id.facts);
        assert_eq!(again.ca_crt, id.ca_crt);
        assert_eq!(
            reason_of(super::keystore::read_pkcs12(&files.keystore, "wrong").map(|_| ())),
            "InvalidPkcs12"
        );
    }
}

#[test]
fn happy_rsa_pkcs8() {
    check_happy(&rcgen::PKCS_RSA_SHA256, Enc::Pkcs8);
}

#[test]
fn happy_rsa_pkcs1() {
    check_happy(&rcgen::PKCS_RSA_SHA256, Enc::Pkcs1);
}

#[test]
fn happy_p256_pkcs8() {
    check_happy(&rcgen::PKCS_ECDSA_P256_SHA256, Enc::Pkcs8);
}

#[test]
fn happy_p256_sec1() {
    check_happy(&rcgen::PKCS_ECDSA_P256_SHA256, Enc::Sec1);
}

#[test]
fn happy_p256_sec1_without_curve_parameters() {
    check_happy(&rcgen::PKCS_ECDSA_P256_SHA256, Enc::Sec1NoParams);
}

#[test]
fn happy_p384_pkcs8() {
    check_happy(&rcgen::PKCS_ECDSA_P384_SHA384, Enc::Pkcs8);
}

#[test]
fn happy_p384_sec1() {
    check_happy(&rcgen::PKCS_ECDSA_P384_SHA384, Enc::Sec1);
}

#[test]
fn happy_p384_sec1_without_curve_parameters() {
    check_happy(&rcgen::PKCS_ECDSA_P384_SHA384, Enc::Sec1NoParams);
}

#[test]
fn happy_ed25519_pkcs8() {
    check_happy(&rcgen::PKCS_ED25519, Enc::Pkcs8);
}

#[test]
fn key_encoding_is_reported() {
    let rsa = rsa_key();
    for (encoding, expected) in [
        (Enc::Pkcs8, KeyEncoding::Pkcs8),
        (Enc::Pkcs1, KeyEncoding::Pkcs1),
    ] {
        let bundle = key_pem(&rsa, encoding);
        let blocks = pem_blocks_of(&bundle);
        let key = PrivateKey::from_der(blocks[0].1.clone(), "test").expect("key");
        assert_eq!(key.encoding(), expected);
    }
    let ec = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, der) = key_der(&ec, Enc::Sec1);
    assert_eq!(
        PrivateKey::from_der(der, "test").expect("key").encoding(),
        KeyEncoding::Sec1
    );
}

#[test]
fn json_without_ca_is_accepted_and_has_no_ca_crt() {
    let s = simple();
    for ca in [None, Some("")] {
        let text = json_value(
            &cert_pem(&s.leaf_der),
            &key_pem(&s.key, Enc::Pkcs8),
            ca.map(|c| c as &str),
        );
        let id = parse_and_validate_json(&text).expect("valid");
        assert_eq!(id.ca_crt, None);
    }
    // An explicit null is also "no CA".
    let text = json!({
        "certificate": cert_pem(&s.leaf_der),
        "private_key": key_pem(&s.key, Enc::Pkcs8),
        "ca": null
    })
    .to_string();
    assert_eq!(parse_and_validate_json(&text).expect("valid").ca_crt, None);
}

#[test]
fn custom_json_field_names() {
    let s = simple();
    let text = json!({
        "crt": cert_pem(&s.leaf_der),
        "key": key_pem(&s.key, Enc::Pkcs8),
        "chain": cert_pem(s.pki.root.der()),
    })
    .to_string();
    let f = JsonFields {
        certificate: "crt".into(),
        private_key: "key".into(),
        ca: "chain".into(),
    };
    let id = validate(&parse_json(&text, &f).expect("parse"), NOW).expect("valid");
    assert!(id.ca_crt.is_some());
    // With the default names, the first missing field is named.
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "MissingField");
    assert!(err.to_string().contains("\"certificate\""), "{err}");
}

#[test]
fn base64_der_values_are_detected() {
    let s = simple();
    let rsa_pki = pki();
    let rsa = rsa_key();
    let rsa_leaf = leaf(&rsa_pki.root, &rsa, |_| {});
    let cases: Vec<(Vec<u8>, Vec<u8>, &[u8])> = vec![
        (
            s.leaf_der.clone(),
            key_der(&s.key, Enc::Pkcs8).1,
            s.pki.root.der().as_ref(),
        ),
        (
            s.leaf_der.clone(),
            key_der(&s.key, Enc::Sec1).1,
            s.pki.root.der().as_ref(),
        ),
        (
            rsa_leaf.clone(),
            key_der(&rsa, Enc::Pkcs1).1,
            rsa_pki.root.der().as_ref(),
        ),
        (
            rsa_leaf.clone(),
            key_der(&rsa, Enc::Pkcs8).1,
            rsa_pki.root.der().as_ref(),
        ),
    ];
    for (cert, key, ca) in cases {
        let key_for_label = key.clone();
        let text = json_value(
            &STANDARD.encode(&cert),
            &STANDARD.encode(&key),
            Some(&STANDARD.encode(ca)),
        );
        let id = parse_and_validate_json(&text).expect("base64 DER accepted");
        assert_eq!(id.tls_crt, cert_pem(&cert));
        // The label is chosen from the DER structure.
        let blocks = pem_blocks_of(id.tls_key.expose());
        assert_eq!(blocks[0].1, key_for_label);
        let expected_label = match PrivateKey::from_der(key, "t").expect("key").encoding() {
            KeyEncoding::Pkcs8 => "PRIVATE KEY",
            KeyEncoding::Pkcs1 => "RSA PRIVATE KEY",
            KeyEncoding::Sec1 => "EC PRIVATE KEY",
        };
        assert_eq!(blocks[0].0, expected_label);
        assert_eq!(id.ca_crt, Some(cert_pem(ca)));
    }
}

#[test]
fn base64_der_chain_and_wrapped_base64_lines() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ED25519);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    let mut chain = leaf_der.clone();
    chain.extend_from_slice(pki.inter.der());
    // base64 split over lines, without padding.
    let b64 = STANDARD.encode(&chain);
    let wrapped = b64
        .trim_end_matches('=')
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = json_value(
        &wrapped,
        &STANDARD.encode(key.serialize_der()),
        Some(&STANDARD.encode(pki.root.der())),
    );
    let id = parse_and_validate_json(&text).expect("valid");
    assert_eq!(
        id.tls_crt,
        format!("{}{}", cert_pem(&leaf_der), cert_pem(pki.inter.der()))
    );
}

#[test]
fn base64_of_pem_text_is_accepted() {
    let s = simple();
    let text = json_value(
        &STANDARD.encode(cert_pem(&s.leaf_der)),
        &STANDARD.encode(key_pem(&s.key, Enc::Sec1)),
        None,
    );
    let id = parse_and_validate_json(&text).expect("valid");
    assert_eq!(id.tls_key.expose(), key_pem(&s.key, Enc::Sec1));
}

#[test]
fn literal_backslash_n_and_bom_and_crlf_are_tolerated() {
    let s = simple();
    let cert = cert_pem(&s.leaf_der).replace('\n', "\\n");
    let key = key_pem(&s.key, Enc::Pkcs8).replace('\n', "\r\n");
    let text = format!("\u{feff}{}", json_value(&cert, &key, None));
    parse_and_validate_json(&text).expect("valid");
}

#[test]
fn pem_bundle_any_order_with_extra_text_and_ec_parameters() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P384_SHA384);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    let ec_params = pem_block("EC PARAMETERS", &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]);
    let bundle = format!(
        "Bag Attributes\n    localKeyID: 01 02\nsubject=/CN=payments-client\n{ec_params}{}{}\n{}",
        key_pem(&key, Enc::Sec1),
        cert_pem(&leaf_der),
        cert_pem(pki.inter.der()),
    );
    let root_pem = cert_pem(pki.root.der());
    let material = parse_pem_bundle(&bundle, Some(&root_pem)).expect("parse");
    assert_eq!(material.chain.len(), 2);
    let id = validate(&material, NOW).expect("valid");
    assert_eq!(
        id.tls_crt,
        format!("{}{}", cert_pem(&leaf_der), cert_pem(pki.inter.der())),
        "leaf then intermediate, CA not included"
    );
    assert_eq!(id.ca_crt.as_deref(), Some(root_pem.as_str()));
    // Without CA text, an empty CA string means no CA.
    let id = validate(&parse_pem_bundle(&bundle, Some("  ")).expect("parse"), NOW).expect("ok");
    assert_eq!(id.ca_crt, None);
}

#[test]
fn decode_binary_accepts_utf8_and_rejects_binary() {
    let s = simple();
    let text = json_value(&cert_pem(&s.leaf_der), &key_pem(&s.key, Enc::Pkcs8), None);
    let decoded = decode_binary(text.as_bytes()).expect("utf-8");
    parse_and_validate_json(decoded).expect("valid");

    let bundle = format!("{}{}", cert_pem(&s.leaf_der), key_pem(&s.key, Enc::Pkcs8));
    let decoded = decode_binary(bundle.as_bytes()).expect("utf-8");
    validate(&parse_pem_bundle(decoded, None).expect("parse"), NOW).expect("valid");

    // A DER certificate stored as SecretBinary.
    assert_eq!(reason_of(decode_binary(&s.leaf_der)), "BinaryNotText");
}

// ---------------------------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------------------------

#[test]
fn chain_through_intermediate_verifies_to_root() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    let chain = format!("{}{}", cert_pem(&leaf_der), cert_pem(pki.inter.der()));
    let text = json_value(
        &chain,
        &key_pem(&key, Enc::Pkcs8),
        Some(&cert_pem(pki.root.der())),
    );
    let id = parse_and_validate_json(&text).expect("valid chain");
    assert_eq!(id.tls_crt, chain);
    assert_eq!(id.facts.issuer, "CN=Test Intermediate CA");
}

#[test]
fn chain_missing_intermediate_is_chain_invalid() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    let text = json_value(
        &cert_pem(&leaf_der),
        &key_pem(&key, Enc::Pkcs8),
        Some(&cert_pem(pki.root.der())),
    );
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "ChainInvalid");
    let msg = err.to_string();
    assert!(msg.contains("unknown issuer"), "{msg}");
    assert!(msg.contains("Test Intermediate CA"), "{msg}");
    assert!(msg.contains("Test Root CA"), "{msg}");
}

#[test]
fn chain_to_other_ca_is_chain_invalid() {
    let s = simple();
    let other = pki();
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&s.key, Enc::Pkcs8),
        Some(&cert_pem(other.root.der())),
    );
    assert_eq!(reason_of(parse_and_validate_json(&text)), "ChainInvalid");
}

#[test]
fn ca_field_may_hold_several_certificates() {
    let s = simple();
    let other = pki();
    let cas = format!(
        "{}{}",
        cert_pem(other.root.der()),
        cert_pem(s.pki.root.der())
    );
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&s.key, Enc::Pkcs8),
        Some(&cas),
    );
    let id = parse_and_validate_json(&text).expect("one of the CAs issued it");
    assert_eq!(id.ca_crt, Some(cas));
}

#[test]
fn chain_without_ca_must_still_link_up() {
    let pki = pki();
    let other = pki_with_inter_window(CA_NB, CA_NA);
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    // Leaf + its own intermediate, no CA: accepted.
    let good = format!("{}{}", cert_pem(&leaf_der), cert_pem(pki.inter.der()));
    parse_and_validate_json(&json_value(&good, &key_pem(&key, Enc::Pkcs8), None)).expect("ok");
    // Leaf + an unrelated intermediate: rejected.
    let bad = format!("{}{}", cert_pem(&leaf_der), cert_pem(other.inter.der()));
    let err = err_of(parse_and_validate_json(&json_value(
        &bad,
        &key_pem(&key, Enc::Pkcs8),
        None,
    )));
    assert_eq!(err.reason(), "ChainInvalid");
    assert!(err.to_string().contains("do not form a chain"), "{err}");
}

#[test]
fn expired_intermediate_is_expired() {
    let pki = pki_with_inter_window(CA_NB, NOW - 10);
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.inter, &key, |_| {});
    let chain = format!("{}{}", cert_pem(&leaf_der), cert_pem(pki.inter.der()));
    let err = err_of(parse_and_validate_json(&json_value(
        &chain,
        &key_pem(&key, Enc::Pkcs8),
        Some(&cert_pem(pki.root.der())),
    )));
    assert_eq!(err.reason(), "Expired");
    assert!(
        err.to_string().contains("intermediate certificate 1"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Facts
// ---------------------------------------------------------------------------------------------

#[test]
fn facts_are_extracted() {
    let s = simple();
    let text = json_value(&cert_pem(&s.leaf_der), &key_pem(&s.key, Enc::Pkcs8), None);
    let id = parse_and_validate_json(&text).expect("valid");
    let f = &id.facts;
    assert_eq!(f.subject, "CN=payments-client, O=Example");
    assert_eq!(f.issuer, "CN=Test Root CA");
    assert_eq!(f.serial_number, "8f010203");
    assert_eq!(f.not_before, LEAF_NB);
    assert_eq!(f.not_after, LEAF_NA);
    assert_eq!(f.not_before_rfc3339(), "2023-11-14T22:13:20Z");
    assert_eq!(f.not_after_rfc3339(), "2030-03-17T17:46:40Z");
    assert_eq!(
        f.sha256_fingerprint,
        hex::encode(Sha256::digest(&s.leaf_der))
    );
    assert_eq!(f.sha256_fingerprint.len(), 64);
    assert_eq!(f.dns_names, vec!["client.example.com".to_owned()]);
    assert_eq!(
        f.uris,
        vec!["spiffe://example.org/ns/payments/sa/client".to_owned()]
    );
}

#[test]
fn rfc3339_formatting() {
    assert_eq!(rfc3339(1_798_761_600), "2027-01-01T00:00:00Z");
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
}

#[test]
fn content_digest_changes_with_ca_only() {
    let s = simple();
    let base = json_value(&cert_pem(&s.leaf_der), &key_pem(&s.key, Enc::Pkcs8), None);
    let with_ca = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&s.key, Enc::Pkcs8),
        Some(&cert_pem(s.pki.root.der())),
    );
    let a = parse_and_validate_json(&base).expect("ok");
    let b = parse_and_validate_json(&with_ca).expect("ok");
    assert_eq!(a.facts, b.facts);
    assert_ne!(a.content_digest(), b.content_digest());
    assert_eq!(
        a.content_digest(),
        parse_and_validate_json(&base).expect("ok").content_digest()
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input, one reason each
// ---------------------------------------------------------------------------------------------

#[test]
fn too_large_inputs() {
    let big = "x".repeat(MAX_SECRET_SIZE + 1);
    assert_eq!(reason_of(parse_json(&big, &fields())), "TooLarge");
    assert_eq!(reason_of(parse_pem_bundle(&big, None)), "TooLarge");
    assert_eq!(reason_of(parse_pem_bundle("", Some(&big))), "TooLarge");
    assert_eq!(reason_of(decode_binary(big.as_bytes())), "TooLarge");
    // Exactly at the limit is not too large (it fails later, for another reason).
    let at_limit = "x".repeat(MAX_SECRET_SIZE);
    assert_ne!(reason_of(parse_json(&at_limit, &fields())), "TooLarge");
}

#[test]
fn invalid_json() {
    for text in [
        "not json",
        "{\"certificate\": ",
        "[1,2]",
        "\"a string\"",
        "42",
    ] {
        assert_eq!(
            reason_of(parse_json(text, &fields())),
            "InvalidJson",
            "{text}"
        );
    }
    // A raw PEM pasted into a Json-format secret gets a hint.
    let s = simple();
    let err = err_of(parse_json(&cert_pem(&s.leaf_der), &fields()));
    assert_eq!(err.reason(), "InvalidJson");
    assert!(err.to_string().contains("format Pem"), "{err}");
    // Literal newlines inside a JSON string get a hint.
    let raw = format!(
        "{{\"certificate\": \"{}\", \"private_key\": \"x\"}}",
        cert_pem(&s.leaf_der)
    );
    let err = err_of(parse_json(&raw, &fields()));
    assert_eq!(err.reason(), "InvalidJson");
    assert!(err.to_string().contains("\\n"), "{err}");
}

#[test]
fn field_not_a_string_is_invalid_json() {
    let s = simple();
    let text = json!({"certificate": 5, "private_key": key_pem(&s.key, Enc::Pkcs8)}).to_string();
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidJson");
    assert!(err.to_string().contains("\"certificate\""), "{err}");
    let text = json!({
        "certificate": cert_pem(&s.leaf_der),
        "private_key": key_pem(&s.key, Enc::Pkcs8),
        "ca": ["x"],
    })
    .to_string();
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidJson");
    assert!(err.to_string().contains("\"ca\""), "{err}");
}

#[test]
fn missing_field() {
    let s = simple();
    let text = json!({"certificate": cert_pem(&s.leaf_der)}).to_string();
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(
        err,
        PkiError::MissingField {
            field: "private_key".into()
        }
    );
    let text = json!({"private_key": key_pem(&s.key, Enc::Pkcs8)}).to_string();
    assert_eq!(
        err_of(parse_json(&text, &fields())),
        PkiError::MissingField {
            field: "certificate".into()
        }
    );
}

#[test]
fn empty_field() {
    let s = simple();
    let text =
        json!({"certificate": " \n ", "private_key": key_pem(&s.key, Enc::Pkcs8)}).to_string();
    assert_eq!(
        err_of(parse_json(&text, &fields())),
        PkiError::EmptyField {
            field: "certificate".into()
        }
    );
    let text = json!({"certificate": cert_pem(&s.leaf_der), "private_key": ""}).to_string();
    assert_eq!(
        err_of(parse_json(&text, &fields())),
        PkiError::EmptyField {
            field: "private_key".into()
        }
    );
}

/// Drop the last few base64 characters of the first block's body.
fn truncate_body(pem: &str) -> String {
    let mut lines: Vec<&str> = pem.lines().collect();
    let end = lines.len() - 2; // the last body line
    let shorter = &lines[end][..lines[end].len() - 3];
    let shorter = shorter.to_owned();
    lines[end] = &shorter;
    lines.join("\n")
}

#[test]
fn invalid_pem_truncated_base64_in_certificate() {
    let s = simple();
    let text = json_value(
        &truncate_body(&cert_pem(&s.leaf_der)),
        &key_pem(&s.key, Enc::Pkcs8),
        None,
    );
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    let msg = err.to_string();
    assert!(msg.contains("field \"certificate\""), "{msg}");
    assert!(
        msg.contains("base64") || msg.contains("does not parse"),
        "{msg}"
    );
}

#[test]
fn invalid_pem_truncated_base64_in_key() {
    let s = simple();
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &truncate_body(&key_pem(&s.key, Enc::Pkcs8)),
        None,
    );
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("field \"private_key\""), "{err}");
}

#[test]
fn invalid_pem_truncated_base64_is_named() {
    // 5 base64 characters cannot be a whole number of groups.
    let text = "-----BEGIN CERTIFICATE-----\nMIIBa\n-----END CERTIFICATE-----\n";
    let err = err_of(parse_pem_bundle(text, None));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("truncated base64"), "{err}");
    assert!(err.to_string().contains("PEM bundle"), "{err}");
}

#[test]
fn invalid_pem_corrupt_der() {
    let s = simple();
    let mut der = s.leaf_der.clone();
    der.truncate(der.len() - 20);
    let text = json_value(&cert_pem(&der), &key_pem(&s.key, Enc::Pkcs8), None);
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(
        err.to_string()
            .contains("DER does not parse as an X.509 certificate"),
        "{err}"
    );
}

#[test]
fn invalid_pem_bad_character_and_missing_end() {
    let s = simple();
    let bad_char = cert_pem(&s.leaf_der).replacen("MII", "M*I", 1);
    let err = err_of(parse_pem_bundle(
        &format!("{bad_char}{}", key_pem(&s.key, Enc::Pkcs8)),
        None,
    ));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("invalid character"), "{err}");

    let pem = cert_pem(&s.leaf_der);
    let no_end = pem.replace("-----END CERTIFICATE-----\n", "");
    let err = err_of(parse_pem_bundle(&no_end, None));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("no matching"), "{err}");
}

#[test]
fn invalid_pem_no_block_and_not_base64() {
    let s = simple();
    let text = json_value("hello world!", &key_pem(&s.key, Enc::Pkcs8), None);
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("no PEM block"), "{err}");
    assert_eq!(
        reason_of(parse_pem_bundle("just some text", None)),
        "InvalidPem"
    );
}

#[test]
fn invalid_pem_base64_that_is_not_a_certificate_or_key() {
    let s = simple();
    let text = json_value(
        &STANDARD.encode(b"definitely not DER"),
        &key_pem(&s.key, Enc::Pkcs8),
        None,
    );
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("X.509"), "{err}");

    let text = json_value(
        &cert_pem(&s.leaf_der),
        &STANDARD.encode(b"definitely not DER"),
        None,
    );
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("private key"), "{err}");
}

#[test]
fn invalid_pem_in_ca() {
    let s = simple();
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&s.key, Enc::Pkcs8),
        Some(&truncate_body(&cert_pem(s.pki.root.der()))),
    );
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("field \"ca\""), "{err}");

    let bundle = format!("{}{}", cert_pem(&s.leaf_der), key_pem(&s.key, Enc::Pkcs8));
    let err = err_of(parse_pem_bundle(&bundle, Some("not a certificate")));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("CA"), "{err}");
}

#[test]
fn invalid_pem_malformed_key_inside_valid_structure() {
    let s = simple();
    // A PKCS#8 with the P-256 OID but a garbage private key inside.
    let algid = enc(
        0x30,
        &[
            enc(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
            enc(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
        ]
        .concat(),
    );
    let der = enc(
        0x30,
        &[
            enc(0x02, &[0]),
            algid,
            enc(0x04, &[0x30, 0x03, 0x02, 0x01, 0x01]),
        ]
        .concat(),
    );
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &pem_block("PRIVATE KEY", &der),
        None,
    );
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "InvalidPem");
    assert!(err.to_string().contains("field \"private_key\""), "{err}");
}

#[test]
fn missing_certificate() {
    let s = simple();
    let err = err_of(parse_pem_bundle(&key_pem(&s.key, Enc::Pkcs8), None));
    assert_eq!(err.reason(), "MissingCertificate");
    // The certificate field holding only a key.
    let text = json_value(
        &key_pem(&s.key, Enc::Pkcs8),
        &key_pem(&s.key, Enc::Pkcs8),
        None,
    );
    assert_eq!(
        reason_of(parse_json(&text, &fields())),
        "MissingCertificate"
    );
    // Material with an empty chain (built by hand) is caught by validate too.
    let mut material = parse_pem_bundle(
        &format!("{}{}", cert_pem(&s.leaf_der), key_pem(&s.key, Enc::Pkcs8)),
        None,
    )
    .expect("parse");
    material.chain.clear();
    assert_eq!(reason_of(validate(&material, NOW)), "MissingCertificate");
}

#[test]
fn missing_private_key() {
    let s = simple();
    let err = err_of(parse_pem_bundle(&cert_pem(&s.leaf_der), None));
    assert_eq!(err.reason(), "MissingPrivateKey");
    assert!(err.to_string().contains("PEM bundle"), "{err}");
    let text = json_value(&cert_pem(&s.leaf_der), &cert_pem(&s.leaf_der), None);
    let err = err_of(parse_json(&text, &fields()));
    assert_eq!(err.reason(), "MissingPrivateKey");
    assert!(err.to_string().contains("private_key"), "{err}");
}

#[test]
fn multiple_keys() {
    let s = simple();
    let other = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let bundle = format!(
        "{}{}{}",
        cert_pem(&s.leaf_der),
        key_pem(&s.key, Enc::Pkcs8),
        key_pem(&other, Enc::Sec1)
    );
    let err = err_of(parse_pem_bundle(&bundle, None));
    assert_eq!(
        err,
        PkiError::MultipleKeys {
            origin: "PEM bundle".into(),
            count: 2
        }
    );
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &format!(
            "{}{}",
            key_pem(&s.key, Enc::Pkcs8),
            key_pem(&s.key, Enc::Pkcs8)
        ),
        None,
    );
    assert_eq!(reason_of(parse_json(&text, &fields())), "MultipleKeys");
}

fn encrypted_pkcs8_der() -> Vec<u8> {
    // EncryptedPrivateKeyInfo { AlgorithmIdentifier { PBES2 }, OCTET STRING <ciphertext> }
    let pbes2 = enc(
        0x06,
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0d],
    );
    enc(0x30, &[enc(0x30, &pbes2), enc(0x04, &[0xaa; 48])].concat())
}

#[test]
fn encrypted_key_pkcs8() {
    let s = simple();
    let bundle = format!(
        "{}{}",
        cert_pem(&s.leaf_der),
        pem_block("ENCRYPTED PRIVATE KEY", &encrypted_pkcs8_der())
    );
    let err = err_of(parse_pem_bundle(&bundle, None));
    assert_eq!(err.reason(), "EncryptedKey");
    // As base64 DER in JSON.
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &STANDARD.encode(encrypted_pkcs8_der()),
        None,
    );
    assert_eq!(reason_of(parse_json(&text, &fields())), "EncryptedKey");
}

#[test]
fn encrypted_key_legacy_proc_type_header() {
    let rsa = rsa_key();
    let (_, der) = key_der(&rsa, Enc::Pkcs1);
    let body = pem_block("RSA PRIVATE KEY", &der);
    let encrypted = body.replacen(
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
        1,
    );
    let pki = pki();
    let leaf_der = leaf(&pki.root, &rsa, |_| {});
    let bundle = format!("{}{encrypted}", cert_pem(&leaf_der));
    assert_eq!(reason_of(parse_pem_bundle(&bundle, None)), "EncryptedKey");

    let ec = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let ec_enc = key_pem(&ec, Enc::Sec1).replacen(
        "-----BEGIN EC PRIVATE KEY-----\n",
        "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\n",
        1,
    );
    let text = json_value(&cert_pem(&leaf_der), &ec_enc, None);
    assert_eq!(reason_of(parse_json(&text, &fields())), "EncryptedKey");
}

/// PKCS#8 with the DSA algorithm OID and arbitrary key bytes.
fn dsa_pkcs8_der() -> Vec<u8> {
    let params = enc(
        0x30,
        &[
            enc(0x02, &[0x00, 0xc1]),
            enc(0x02, &[0x71]),
            enc(0x02, &[0x05]),
        ]
        .concat(),
    );
    let algid = enc(
        0x30,
        &[
            enc(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01]),
            params,
        ]
        .concat(),
    );
    enc(
        0x30,
        &[enc(0x02, &[0]), algid, enc(0x04, &enc(0x02, &[0x42; 20]))].concat(),
    )
}

#[test]
fn unsupported_key_dsa() {
    let s = simple();
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &pem_block("PRIVATE KEY", &dsa_pkcs8_der()),
        None,
    );
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "UnsupportedKey");
    assert!(err.to_string().contains("DSA"), "{err}");

    // The OpenSSL traditional "DSA PRIVATE KEY" block.
    let traditional = enc(
        0x30,
        &(0..6)
            .flat_map(|i| enc(0x02, &[i + 1]))
            .collect::<Vec<u8>>(),
    );
    let bundle = format!(
        "{}{}",
        cert_pem(&s.leaf_der),
        pem_block("DSA PRIVATE KEY", &traditional)
    );
    assert_eq!(reason_of(parse_pem_bundle(&bundle, None)), "UnsupportedKey");
    // The same structure as base64 DER is recognised as DSA, not as a broken RSA key.
    let text = json_value(&cert_pem(&s.leaf_der), &STANDARD.encode(&traditional), None);
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "UnsupportedKey");
    assert!(err.to_string().contains("DSA"), "{err}");
}

#[test]
fn unsupported_key_p521() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P521_SHA512);
    let leaf_der = leaf(&pki.root, &key, |_| {});
    for encoding in [Enc::Pkcs8, Enc::Sec1, Enc::Sec1NoParams] {
        let text = json_value(&cert_pem(&leaf_der), &key_pem(&key, encoding), None);
        let err = err_of(parse_and_validate_json(&text));
        assert_eq!(err.reason(), "UnsupportedKey", "{encoding:?}");
        assert!(err.to_string().contains("P-521"), "{err}");
    }
}

#[test]
fn unsupported_key_small_rsa_and_openssh() {
    let s = simple();
    // PKCS#1 layout with a 1024-bit modulus (values arbitrary; the size check comes first).
    let mut ints = vec![enc(0x02, &[0])];
    ints.push(enc(0x02, &[[0x00].as_slice(), &[0xc3; 128]].concat()));
    for _ in 0..7 {
        ints.push(enc(0x02, &[0x03]));
    }
    let pkcs1 = enc(0x30, &ints.concat());
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &pem_block("RSA PRIVATE KEY", &pkcs1),
        None,
    );
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "UnsupportedKey");
    assert!(err.to_string().contains("1024"), "{err}");

    let text = json_value(
        &cert_pem(&s.leaf_der),
        &pem_block("OPENSSH PRIVATE KEY", b"openssh-key-v1\0"),
        None,
    );
    assert_eq!(reason_of(parse_json(&text, &fields())), "UnsupportedKey");
}

#[test]
fn key_mismatch() {
    let s = simple();
    let other = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let text = json_value(&cert_pem(&s.leaf_der), &key_pem(&other, Enc::Pkcs8), None);
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "KeyMismatch");
    assert!(err.to_string().contains("payments-client"), "{err}");
    // A key of another type entirely.
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&rsa_key(), Enc::Pkcs1),
        None,
    );
    assert_eq!(reason_of(parse_and_validate_json(&text)), "KeyMismatch");
    // certified_key refuses too.
    let material = parse_json(&text, &fields()).expect("parse");
    assert_eq!(
        reason_of(certified_key(&material).map(|_| ())),
        "KeyMismatch"
    );
}

#[test]
fn not_yet_valid() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.root, &key, |p| {
        p.not_before = ts(NOW + 3600);
    });
    let text = json_value(&cert_pem(&leaf_der), &key_pem(&key, Enc::Pkcs8), None);
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "NotYetValid");
    assert!(err.to_string().contains(&rfc3339(NOW + 3600)), "{err}");
}

#[test]
fn expired() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.root, &key, |p| {
        p.not_after = ts(NOW - 1);
    });
    let text = json_value(&cert_pem(&leaf_der), &key_pem(&key, Enc::Pkcs8), None);
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "Expired");
    assert!(err.to_string().contains(&rfc3339(NOW - 1)), "{err}");
    assert!(err.to_string().contains("leaf certificate"), "{err}");
    // The boundary itself is still valid (notAfter is inclusive).
    let material = parse_json(&text, &fields()).expect("parse");
    validate(&material, NOW - 1).expect("valid at notAfter");
}

#[test]
fn expired_is_reported_even_with_a_ca() {
    let s = simple();
    let text = json_value(
        &cert_pem(&s.leaf_der),
        &key_pem(&s.key, Enc::Pkcs8),
        Some(&cert_pem(s.pki.root.der())),
    );
    let material = parse_json(&text, &fields()).expect("parse");
    assert_eq!(reason_of(validate(&material, LEAF_NA + 1)), "Expired");
    assert_eq!(reason_of(validate(&material, LEAF_NB - 1)), "NotYetValid");
}

#[test]
fn missing_client_auth() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_der = leaf(&pki.root, &key, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let text = json_value(
        &cert_pem(&leaf_der),
        &key_pem(&key, Enc::Pkcs8),
        Some(&cert_pem(pki.root.der())),
    );
    let err = err_of(parse_and_validate_json(&text));
    assert_eq!(err.reason(), "MissingClientAuth");
    assert!(err.to_string().contains("serverAuth"), "{err}");
}

#[test]
fn eku_absent_or_any_is_accepted() {
    let pki = pki();
    let key = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    for ekus in [
        vec![],
        vec![ExtendedKeyUsagePurpose::Any],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    ] {
        let leaf_der = leaf(&pki.root, &key, |p| p.extended_key_usages = ekus.clone());
        let text = json_value(
            &cert_pem(&leaf_der),
            &key_pem(&key, Enc::Pkcs8),
            Some(&cert_pem(pki.root.der())),
        );
        parse_and_validate_json(&text).unwrap_or_else(|e| panic!("{ekus:?}: {e}"));
    }
}

#[test]
fn every_reason_is_listed_and_camel_case() {
    let samples = PkiError::samples();
    let reasons: Vec<_> = samples.iter().map(PkiError::reason).collect();
    assert_eq!(reasons, PkiError::REASONS);
    for r in reasons {
        assert!(r.as_str().chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
        assert!(
            r.as_str().starts_with(|c: char| c.is_ascii_uppercase()),
            "{r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Private keys never leak
// ---------------------------------------------------------------------------------------------

/// Fails if any PEM body line, or any 16-character run of the key's base64, shows up in `text`.
fn assert_no_key_material(text: &str, key_pem: &str) {
    let body: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    for line in &body {
        assert!(!text.contains(line), "key line leaked into: {text}");
    }
    let b64: String = body.concat();
    let bytes = b64.as_bytes();
    for start in (0..bytes.len().saturating_sub(16)).step_by(4) {
        let window = std::str::from_utf8(&bytes[start..start + 16]).expect("ascii");
        assert!(!text.contains(window), "key material leaked into: {text}");
    }
}

#[test]
fn errors_and_debug_never_contain_key_material() {
    let s = simple();
    let kpem = key_pem(&s.key, Enc::Pkcs8);
    let other = gen_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let other_pem = key_pem(&other, Enc::Sec1);
    let rsa = rsa_key();
    let rsa_pem = key_pem(&rsa, Enc::Pkcs1);
    let cert = cert_pem(&s.leaf_der);

    let mut errors: Vec<(PkiError, &str)> = Vec::new();
    // Key mismatch.
    errors.push((
        err_of(parse_and_validate_json(&json_value(
            &cert, &other_pem, None,
        ))),
        &other_pem,
    ));
    // Truncated key base64.
    errors.push((
        err_of(parse_json(
            &json_value(&cert, &truncate_body(&kpem), None),
            &fields(),
        )),
        &kpem,
    ));
    // Key with a bad character in it.
    let corrupt = kpem.replacen("MI", "M!", 1);
    errors.push((
        err_of(parse_json(&json_value(&cert, &corrupt, None), &fields())),
        &kpem,
    ));
    // Key DER truncated but base64 intact.
    let (_, der) = key_der(&s.key, Enc::Pkcs8);
    let cut = pem_block("PRIVATE KEY", &der[..der.len() - 10]);
    errors.push((
        err_of(parse_and_validate_json(&json_value(&cert, &cut, None))),
        &kpem,
    ));
    // Multiple keys.
    errors.push((
        err_of(parse_pem_bundle(&format!("{cert}{kpem}{other_pem}"), None)),
        &kpem,
    ));
    // Key in the certificate field, nothing usable there.
    errors.push((
        err_of(parse_json(&json_value(&kpem, &kpem, None), &fields())),
        &kpem,
    ));
    // Broken JSON around a key (serde_json's message must not quote it).
    let broken = json_value(&cert, &kpem, None).replace("\"private_key\":", "\"private_key\"");
    errors.push((err_of(parse_json(&broken, &fields())), &kpem));
    // Raw newlines in the JSON string holding the key.
    let raw = format!("{{\"certificate\": \"x\", \"private_key\": \"{kpem}\"}}");
    errors.push((err_of(parse_json(&raw, &fields())), &kpem));
    // RSA key against an EC certificate.
    errors.push((
        err_of(parse_and_validate_json(&json_value(&cert, &rsa_pem, None))),
        &rsa_pem,
    ));
    // Encrypted-looking header on a real key body.
    let legacy = rsa_pem.replacen(
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\n",
        1,
    );
    errors.push((
        err_of(parse_json(&json_value(&cert, &legacy, None), &fields())),
        &rsa_pem,
    ));

    for (err, key) in &errors {
        assert_no_key_material(&err.to_string(), key);
        assert_no_key_material(&format!("{err:?}"), key);
    }

    // Debug of the parsed and validated values is redacted too.
    let material = parse_json(&json_value(&cert, &kpem, None), &fields()).expect("parse");
    assert_no_key_material(&format!("{material:?}"), &kpem);
    let id = validate(&material, NOW).expect("valid");
    let debug = format!("{id:?}");
    assert_no_key_material(&debug, &kpem);
    assert!(debug.contains("<redacted>"), "{debug}");
    assert_eq!(format!("{:?}", id.tls_key), "<redacted>");
    assert_eq!(id.tls_key.expose(), kpem);
}
