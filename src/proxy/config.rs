//! Checked configuration: the upstream URL and the trust roots for verifying it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::Uri;
use hyper::http::uri::{Authority, Scheme};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::ProxyError;

/// The one upstream every request goes to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host[:port]` exactly as given: the URI authority, so also what hyper puts in `Host`.
    pub authority: Authority,
    /// Host without IPv6 brackets, for connecting.
    pub host: String,
    pub port: u16,
    /// SNI and the name the upstream's certificate is verified against.
    pub server_name: ServerName<'static>,
}

impl Upstream {
    /// Parse `https://host[:port]` (a trailing `/` is tolerated; other paths, queries and user info
    /// are refused rather than silently ignored).
    pub fn parse(text: &str) -> Result<Self, ProxyError> {
        let invalid = |detail: &str| ProxyError::InvalidUpstream {
            detail: format!("{text:?}: {detail}"),
        };
        let uri: Uri = text
            .parse()
            .map_err(|_| invalid("not a URL; expected https://host[:port]"))?;
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return Err(invalid("the scheme must be https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user info is not supported"));
        }
        if !matches!(
            uri.path_and_query().map(|p| p.as_str()),
            None | Some("/") | Some("")
        ) {
            return Err(invalid(
                "a path or query is not supported; requests keep the application's path",
            ));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
        Ok(Upstream {
            port: authority.port_u16().unwrap_or(443),
            authority,
            host,
            server_name,
        })
    }
}

/// `address`, an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) read as the IPv4 address it is.
pub fn unmapped(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Trust roots for the upstream: the system store, or the CA certificates in a PEM file.
pub(crate) fn system_roots() -> Result<Arc<RootCertStore>, ProxyError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let detail = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no certificates found".to_owned());
        return Err(ProxyError::NoTrustRoots { detail });
    }
    Ok(Arc::new(roots))
}

/// Parse PEM text holding CA certificates into a root store.
pub(crate) fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, ProxyError> {
    let invalid = |detail: String| ProxyError::InvalidUpstreamCa {
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block".to_owned()));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("certificate {}: {e}", i + 1)))?;
    }
    Ok(Arc::new(roots))
}
