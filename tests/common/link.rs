//! A TCP link to kube-apiserver, on loopback, that a test can cut: every open connection is closed
//! and new ones are refused until it is restored. What an operator sees when the network between
//! it and the control plane fails: its watches disconnect, and whatever happens meanwhile reaches
//! it only through a re-list.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct ApiLink {
    pub address: SocketAddr,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for ApiLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_replace(true);
    }
}

impl ApiLink {
    /// Starts a link to `upstream` (host:port).
    pub async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let watching = cut.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut is_cut = watching.subscribe();
                if *is_cut.borrow() {
                    // Refused: closed at once, as an unreachable peer would leave it.
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Self {
            address,
            cut,
            accept,
        })
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again. (`send_replace`: a plain `send` fails, and changes nothing,
    /// while no connection holds a receiver.)
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// A client acting as ServiceAccount `namespace/name` whose every request goes through the link.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client> {
        let path = xtask::support::service_account_kubeconfig_file(namespace, name).await?;
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let port = self.address.port();
        config.cluster_url = format!("https://127.0.0.1:{port}")
            .parse()
            .context("the link's URL")?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// kube-apiserver's host:port.
pub fn apiserver_address() -> Result<String> {
    let url = &xtask::support::environment().apiserver_url;
    let address = url.strip_prefix("https://").unwrap_or(url);
    Ok(address.trim_end_matches('/').to_string())
}
