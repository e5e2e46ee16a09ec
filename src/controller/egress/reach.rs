//! How far a tenant's egress proxy may reach (#25): who may send through it (`allowFrom`) and what
//! it may call (`upstream`). The spec is the tenant's, the proxy carries the tenant's certificate
//! and runs in the tenant's namespace, but the NetworkPolicy and the Deployment are written by the
//! operator: without these checks a tenant could open its proxy to every namespace or to
//! `0.0.0.0/0`, or point it at the cloud's metadata endpoint or at in-cluster services. Pure: the
//! reconcile asks, and writes nothing when the answer is a refusal.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;

use crate::api::EgressSpec;

/// What the admin allows beyond the safe default (flags `--egress-allow-*`, chart `egress.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressReach {
    /// `allowFrom` peers with a `namespaceSelector` other than the identity's own namespace.
    pub peers_outside_namespace: bool,
    /// `allowFrom` peers with an `ipBlock`.
    pub ip_block_peers: bool,
    /// Upstreams on loopback, link-local (cloud metadata) or unspecified addresses, and in-cluster
    /// names (`*.svc`, `*.cluster.local`, names without a dot, `localhost`).
    pub internal_upstreams: bool,
    /// Further address ranges no upstream may be in (the cluster's service, pod and node ranges).
    pub denied_upstream_ranges: Vec<ipnet::IpNet>,
}

/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Addresses no upstream may have unless `internal_upstreams`: loopback, unspecified, link-local
/// (169.254.169.254 is every cloud's metadata endpoint), and EC2's IPv6 metadata endpoint.
const INTERNAL_RANGES: [&str; 7] = [
    "127.0.0.0/8",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "::/128",
    "fe80::/10",
    "fd00:ec2::254/128",
];

impl EgressReach {
    /// The ranges a proxy must never connect to, whatever its upstream's name resolves to:
    /// the internal ones unless allowed, and the denied ones.
    pub fn refused_ranges(&self) -> Vec<ipnet::IpNet> {
        internal_ranges()
            .filter(|_| !self.internal_upstreams)
            .chain(self.denied_upstream_ranges.iter().cloned())
            .collect()
    }
}

/// [`INTERNAL_RANGES`], parsed.
fn internal_ranges() -> impl Iterator<Item = ipnet::IpNet> {
    INTERNAL_RANGES
        .iter()
        .filter_map(|range| range.parse::<ipnet::IpNet>().ok())
}

/// Names that reach the node or the cluster, not a partner.
fn is_internal_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    !host.contains('.')
        || host == "localhost"
        || host.ends_with(".localhost")
        || host.ends_with(".svc")
        || host.contains(".svc.")
        || host.ends_with(".cluster.local")
        || host == "metadata.google.internal"
        || host == "instance-data.ec2.internal"
}

/// Why `spec` reaches further than this operator allows (`None`: it does not).
pub fn refusal(spec: &EgressSpec, namespace: &str, reach: &EgressReach) -> Option<String> {
    for (index, peer) in spec.allow_from.iter().flatten().enumerate() {
        if let Some(problem) = peer_problem(peer, namespace, reach) {
            return Some(format!("spec.egress.allowFrom[{index}] {problem}"));
        }
    }
    upstream_problem(&spec.upstream, reach).map(|problem| format!("spec.egress.upstream {problem}"))
}

fn peer_problem(peer: &NetworkPolicyPeer, namespace: &str, reach: &EgressReach) -> Option<String> {
    if peer.ip_block.is_some() && !reach.ip_block_peers {
        return Some(
            "is an ipBlock: address ranges may not use the proxy unless the operator allows it \
             (--egress-allow-ip-blocks, chart egress.allowIpBlocks)"
                .into(),
        );
    }
    let own_namespace_only =
        |selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector| {
            selector
                .match_expressions
                .as_ref()
                .is_none_or(Vec::is_empty)
                && selector.match_labels.as_ref().is_some_and(|labels| {
                    labels.len() == 1
                        && labels.get(NAMESPACE_NAME_LABEL).map(String::as_str) == Some(namespace)
                })
        };
    match &peer.namespace_selector {
        Some(selector) if !reach.peers_outside_namespace && !own_namespace_only(selector) => {
            Some(format!(
                "selects namespaces other than {namespace}: pods elsewhere may not use this \
                 namespace's certificate unless the operator allows it \
                 (--egress-allow-peers-outside-namespace, chart egress.allowPeersOutsideNamespace)"
            ))
        }
        _ => None,
    }
}

fn upstream_problem(upstream: &str, reach: &EgressReach) -> Option<String> {
    let parsed = match crate::proxy::config::Upstream::parse(upstream) {
        Ok(parsed) => parsed,
        Err(error) => return Some(error.to_string()),
    };
    // ::ffff:127.0.0.1 is 127.0.0.1.
    let address = parsed
        .host
        .parse::<IpAddr>()
        .ok()
        .map(crate::proxy::config::unmapped);
    let internal = !reach.internal_upstreams
        && match address {
            Some(address) => internal_ranges().any(|range| range.contains(&address)),
            None => is_internal_name(&parsed.host),
        };
    if internal {
        return Some(format!(
            "{upstream:?} is on the node or in the cluster (loopback, link-local such as the cloud \
             metadata endpoint, or an in-cluster name): not allowed unless the operator allows it \
             (--egress-allow-internal-upstreams, chart egress.allowInternalUpstreams)"
        ));
    }
    let denied = address.and_then(|address| {
        reach
            .denied_upstream_ranges
            .iter()
            .find(|range| range.contains(&address))
    });
    denied.map(|range| {
        format!(
            "{upstream:?} is in {range}, which the operator denies (--egress-denied-upstream-cidr, \
             chart egress.deniedUpstreamCidrs)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(upstream: &str, allow_from: Option<serde_json::Value>) -> EgressSpec {
        serde_json::from_value(serde_json::json!({
            "upstream": upstream,
            "allowFrom": allow_from,
        }))
        .unwrap()
    }

    #[test]
    fn peers_stay_in_the_namespace_and_off_ip_blocks_unless_allowed() {
        let strict = EgressReach::default();
        let own = serde_json::json!([{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "team"}}, "podSelector": {}}, {"podSelector": {"matchLabels": {"app": "x"}}}]);
        assert_eq!(
            refusal(
                &spec("https://api.partner.example", Some(own)),
                "team",
                &strict
            ),
            None
        );
        for attack in [
            serde_json::json!([{"namespaceSelector": {}}]),
            serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}]),
            serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team", "x": "y"}}}]),
            serde_json::json!([{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "Exists"}]}}]),
            serde_json::json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}]),
        ] {
            let refused = refusal(
                &spec("https://api.partner.example", Some(attack.clone())),
                "team",
                &strict,
            );
            assert!(
                refused.is_some_and(|why| why.starts_with("spec.egress.allowFrom[0]")),
                "{attack}"
            );
        }
        let open = EgressReach {
            peers_outside_namespace: true,
            ip_block_peers: true,
            ..EgressReach::default()
        };
        let wide =
            serde_json::json!([{"namespaceSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]);
        assert_eq!(
            refusal(
                &spec("https://api.partner.example", Some(wide)),
                "team",
                &open
            ),
            None
        );
    }

    #[test]
    fn upstreams_on_the_node_or_in_the_cluster_are_refused_unless_allowed() {
        let strict = EgressReach {
            denied_upstream_ranges: vec!["10.96.0.0/12".parse().unwrap()],
            ..EgressReach::default()
        };
        for good in [
            "https://api.partner.example",
            "https://203.0.113.7:8443",
            "https://[2001:db8::1]",
        ] {
            assert_eq!(refusal(&spec(good, None), "team", &strict), None, "{good}");
        }
        for internal in [
            "https://127.0.0.1",
            "https://169.254.169.254",
            "https://[fd00:ec2::254]",
            "https://[::1]:8443",
            "https://[::ffff:169.254.169.254]",
            "https://0.0.0.0",
            "https://localhost",
            "https://kubernetes",
            "https://kubernetes.default.svc",
            "https://api.team.svc.cluster.local",
            "https://metadata.google.internal",
            "https://10.96.0.1",
        ] {
            assert!(
                refusal(&spec(internal, None), "team", &strict).is_some(),
                "{internal}"
            );
        }
        let open = EgressReach {
            internal_upstreams: true,
            ..EgressReach::default()
        };
        assert_eq!(
            refusal(&spec("https://kubernetes.default.svc", None), "team", &open),
            None
        );
    }
}
