//! The control plane's own PKI, made fresh at every start: a CA, the API server's serving
//! certificate, an admin client certificate (O=system:masters) and the service-account signing key.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct ControlPlanePki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub ca_cert_pem: String,
    /// PKCS#8 ECDSA key that signs service-account tokens, and its public half that verifies them.
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

pub fn generate(dir: &Path) -> Result<ControlPlanePki> {
    fs::create_dir_all(dir)?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mtls-operator testenv CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut serving_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    for ip in ["127.0.0.1", "10.0.0.1"] {
        serving_params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse()?));
    }
    serving_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving = serving_params.signed_by(&serving_key, &ca)?;

    let mut admin_params = CertificateParams::new(Vec::<String>::new())?;
    admin_params
        .distinguished_name
        .push(DnType::CommonName, "admin");
    admin_params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin = admin_params.signed_by(&admin_key, &ca)?;

    let service_account_key = KeyPair::generate()?;

    let pki = ControlPlanePki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert_pem: admin.pem(),
        admin_key_pem: admin_key.serialize_pem(),
        ca_cert_pem: ca.pem(),
        service_account_key: dir.join("service-account.key"),
        service_account_public_key: dir.join("service-account.pub"),
    };
    fs::write(&pki.ca_cert, &pki.ca_cert_pem)?;
    fs::write(&pki.serving_cert, serving.pem())?;
    write_private(&pki.serving_key, &serving_key.serialize_pem())?;
    write_private(
        &pki.service_account_key,
        &service_account_key.serialize_pem(),
    )?;
    fs::write(
        &pki.service_account_public_key,
        service_account_key.public_key_pem(),
    )?;
    Ok(pki)
}
