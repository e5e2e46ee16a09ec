//! Hot reload of the client certificate from a mounted Secret.
//!
//! The kubelet updates a Secret volume by writing a new timestamped directory and renaming a new
//! `..data` symlink over the old one, so `tls.crt` and `tls.key` (symlinks into `..data`) change
//! together and atomically. We poll the files, compare a digest, and on change build a new
//! certificate *generation*: a fresh rustls config and connection pool. Requests already running keep
//! the generation they started with; new requests use the new one, and the old pool's connections
//! close as soon as their in-flight exchanges end. A pair that does not load (unparsable, key not
//! matching) is refused: the previous generation stays, with a log line and a metric.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Generation, ProxyError, Shared, config, forward};
use crate::pki::{self, PkiError};

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// A certificate and key that load and match, with facts for logs and metrics.
pub(crate) struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub serial: String,
    pub sha256: String,
    pub not_after: i64,
}

/// Load `tls.crt` (leaf first, then intermediates) and `tls.key`, checking the key matches the leaf.
pub(crate) fn load_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCert, PkiError> {
    let cert_text = pki::decode_binary(cert_pem)?;
    let key_text = pki::decode_binary(key_pem)?;
    // One bundle is what the pki parser takes; the newline keeps the two PEM texts apart.
    let bundle = format!("{cert_text}\n{key_text}");
    let material = pki::parse_pem_bundle(&bundle, None)?;
    let key = pki::certified_key(&material)?;
    let leaf = material.chain.first().ok_or(PkiError::MissingCertificate {
        origin: CERT_FILE.to_owned(),
    })?;
    let (serial, not_after) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => (
            hex::encode(cert.raw_serial()),
            cert.validity().not_after.timestamp(),
        ),
        // certified_key parsed the leaf already; this cannot fail in practice.
        Err(_) => (String::new(), 0),
    };
    Ok(LoadedCert {
        key,
        serial,
        sha256: hex::encode(Sha256::digest(leaf.as_ref())),
        not_after,
    })
}

/// The bytes of one consistent look at the files.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl Files {
    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.ca.as_ref()] {
            match part {
                Some(bytes) => {
                    hasher.update((bytes.len() as u64 + 1).to_be_bytes());
                    hasher.update(bytes);
                }
                None => hasher.update(0u64.to_be_bytes()),
            }
        }
        hasher.finalize().into()
    }
}

/// Polls the certificate directory (and the upstream CA file, when one is configured).
pub(crate) struct Reloader {
    shared: Arc<Shared>,
    cert_dir: PathBuf,
    upstream_ca: Option<PathBuf>,
    /// The system roots, loaded once, when no CA file is configured.
    system_roots: Option<Arc<RootCertStore>>,
    /// Digest of the files last acted on (loaded or refused), so a refused pair is reported once.
    last_digest: Option<[u8; 32]>,
    /// Last read error, so a missing file is reported once rather than every interval.
    last_read_error: Option<String>,
    next_generation: u64,
}

impl Reloader {
    pub(crate) fn new(
        shared: Arc<Shared>,
        cert_dir: PathBuf,
        upstream_ca: Option<PathBuf>,
        system_roots: Option<Arc<RootCertStore>>,
    ) -> Self {
        Reloader {
            shared,
            cert_dir,
            upstream_ca,
            system_roots,
            last_digest: None,
            last_read_error: None,
            next_generation: 1,
        }
    }

    /// Poll every `interval` until shutdown.
    pub(crate) async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the caller has just polled.
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.poll().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Look at the files once; load them if they changed.
    pub(crate) async fn poll(&mut self) {
        let files = match self.read().await {
            Ok(Some(files)) => files,
            // The files changed while we read them: look again next time.
            Ok(None) => return,
            Err(error) => {
                if self.last_read_error.as_deref() != Some(error.as_str()) {
                    warn!(
                        %error,
                        in_use = self.shared.current().is_some(),
                        "cannot read the client certificate files"
                    );
                    self.shared.metrics.reload(false);
                    self.last_read_error = Some(error);
                }
                return;
            }
        };
        self.last_read_error = None;
        let digest = files.digest();
        if self.last_digest == Some(digest) {
            return;
        }
        self.last_digest = Some(digest);
        match self.build(&files) {
            Ok((generation, loaded)) => {
                let replaced = self.shared.install(generation);
                self.shared.metrics.reload(true);
                self.shared
                    .metrics
                    .certificate_not_after
                    .set(loaded.not_after);
                info!(
                    generation = self.next_generation - 1,
                    serial = %loaded.serial,
                    sha256 = %loaded.sha256,
                    not_after = %pki_time(loaded.not_after),
                    replaced,
                    "client certificate loaded; new upstream connections use it"
                );
                let now = chrono::Utc::now().timestamp();
                if loaded.not_after < now {
                    warn!(serial = %loaded.serial, "the client certificate in use has expired");
                }
            }
            Err(error) => {
                self.shared.metrics.reload(false);
                warn!(
                    reason = error.reason().as_str(),
                    %error,
                    in_use = self.shared.current().is_some(),
                    "refused the client certificate files; keeping the certificate in use"
                );
            }
        }
    }

    fn build(&mut self, files: &Files) -> Result<(Generation, LoadedCert), ProxyError> {
        let loaded = load_pair(&files.cert, &files.key).map_err(ProxyError::Certificate)?;
        let roots = match (&files.ca, &self.upstream_ca, &self.system_roots) {
            (Some(pem), Some(path), _) => config::roots_from_pem(path, pem)?,
            (_, _, Some(roots)) => roots.clone(),
            _ => {
                return Err(ProxyError::NoTrustRoots {
                    detail: "no upstream CA file and no system roots".to_owned(),
                });
            }
        };
        let clients = forward::clients_for(&self.shared, roots, loaded.key.clone())?;
        let generation = Generation {
            id: self.next_generation,
            clients,
        };
        self.next_generation += 1;
        Ok((generation, loaded))
    }

    /// Read the files; `None` when `tls.crt` changed between the first and last read (a swap in
    /// progress), so a key is never paired with the wrong certificate.
    async fn read(&self) -> Result<Option<Files>, String> {
        let cert_path = self.cert_dir.join(CERT_FILE);
        let key_path = self.cert_dir.join(KEY_FILE);
        let cert = read(&cert_path).await?;
        let key = read(&key_path).await?;
        let ca = match &self.upstream_ca {
            Some(path) => Some(read(path).await?),
            None => None,
        };
        if read(&cert_path).await? != cert {
            return Ok(None);
        }
        Ok(Some(Files { cert, key, ca }))
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, String> {
    tokio::fs::read(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn pki_time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}
