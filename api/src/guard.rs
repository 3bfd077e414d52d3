//! Where the api's outgoing requests to URLs callers name may go — webhooks
//! (`dispatcher/`) and files fetched by URL (`media_in.rs`): never to an address in a
//! loopback, private, shared, link-local (cloud metadata lives there), multicast or reserved
//! range, unless the operator allows it ([`Reach`]: `WEBHOOK_ALLOW_PRIVATE`,
//! `MEDIA_URL_ALLOW_NETS`).
//!
//! The address rule is applied when a webhook is registered (so a user learns at once), and
//! on every connection, through [`GuardedResolver`], reqwest's resolver for every name it
//! connects to. The second check is the one that matters: a name that resolved to a public
//! address at registration can be re-pointed at `169.254.169.254` later, and the resolver
//! answers only the addresses that pass, so the connection is made to what was checked. URLs
//! with an IP address in them bypass resolution and are checked before each attempt, and each
//! redirect's target ([`check_literal`]).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use reqwest::Url;
use shared::{Error, Result, webhook::MAX_URL_LEN};

/// The addresses a guarded client may connect to: public ones, and those the operator
/// allows.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Any address at all (local set-ups and tests).
    pub allow_private: bool,
    /// Networks allowed although not public (an internal media server, say).
    pub allow_nets: Arc<[IpNet]>,
}

impl Reach {
    pub fn public_only() -> Reach {
        Reach::default()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || !is_forbidden(ip) || self.allow_nets.iter().any(|n| n.contains(&ip))
    }
}

/// How long registration waits for the URL's host to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether connecting to `ip` is refused when private addresses are not allowed.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (AWS metadata fd00:ec2::254)
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                // Tunnels that carry IPv4 inside, to wherever the embedded address points:
                || s[0] == 0x2002 // 6to4 2002::/16
                || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32
                || s[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible ::a.b.c.d
                || s[..6] == [0, 0, 0, 0, 0xffff, 0] // IPv4-translated ::ffff:0:a.b.c.d
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: AWS, GCP and Azure metadata
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared 100.64/10 (Alibaba metadata)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

/// What any URL the api fetches must look like, whatever it points at: at most
/// `MAX_URL_LEN` long, `https://` (or `http://` with `allow_http`), no credentials. Answers it
/// parsed, or why not (for people).
pub fn check_shape(raw: &str, allow_http: bool) -> std::result::Result<Url, String> {
    if raw.len() > MAX_URL_LEN {
        return Err(format!("a url is at most {MAX_URL_LEN} characters"));
    }
    let url = Url::parse(raw).map_err(|e| format!("not a valid URL: {e}"))?;
    check_scheme(&url, allow_http)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a url must not carry credentials".into());
    }
    Ok(url)
}

/// `https://`, or `http://` with `allow_http` (a redirect's target is held to it too).
pub fn check_scheme(url: &Url, allow_http: bool) -> std::result::Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http => Ok(()),
        other => Err(format!("a url must use https://, not {other}://")),
    }
}

/// Checks an endpoint URL at registration: its shape, and every address its host resolves
/// to. Answers it parsed.
pub async fn check_url(raw: &str, allow_http: bool, reach: &Reach) -> Result<Url> {
    let bad = |m: String| Error::invalid_field("url", m);
    let url = check_shape(raw, allow_http).map_err(|why| bad(format!("url: {why}")))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = match url.host() {
        None => return Err(bad("url has no host".into())),
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(name)) => {
            let lookup = tokio::net::lookup_host((name, port));
            let found = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
                .await
                .ok()
                .and_then(|r| r.ok())
                .ok_or_else(|| bad(format!("the host {name} does not resolve")))?;
            found.map(|a| a.ip()).collect()
        }
    };
    if addrs.is_empty() {
        return Err(bad("the url's host has no address".into()));
    }
    // Which address a name resolved to is the network's business, not the caller's: the
    // answer says only that it is not public.
    if addrs.iter().any(|ip| !reach.allows(*ip)) {
        return Err(bad(
            "url points at a loopback, private, link-local or reserved address; \
             webhooks go to public addresses only"
                .into(),
        ));
    }
    Ok(url)
}

/// The connect-time check for URLs that name an IP address (reqwest resolves only names).
pub fn check_literal(url: &Url, reach: &Reach) -> std::result::Result<(), String> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    if reach.allows(ip) {
        Ok(())
    } else {
        Err(format!("refused: {ip} is not a public address"))
    }
}

/// reqwest's resolver for guarded connections: the system's answer without the forbidden
/// addresses; an error when none is left.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Reach);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let reach = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| reach.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> = if found.is_empty() {
                    format!("{host} has no address").into()
                } else {
                    format!("refused: {host} resolves to addresses that are not public").into()
                };
                return Err(refused);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_metadata_ranges_are_forbidden_public_ones_not() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:a9fe:a9fe",
        ] {
            assert!(is_forbidden(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "172.32.0.1"] {
            assert!(!is_forbidden(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn an_allowed_network_is_reached_and_only_it() {
        let reach = Reach {
            allow_private: false,
            allow_nets: vec!["10.1.0.0/16".parse().expect("net")].into(),
        };
        assert!(reach.allows("10.1.2.3".parse().expect("ip")));
        assert!(reach.allows("8.8.8.8".parse().expect("ip")));
        for ip in ["10.2.0.1", "127.0.0.1", "169.254.169.254"] {
            assert!(!reach.allows(ip.parse().expect("ip")), "{ip}");
        }
        assert!(!Reach::public_only().allows("10.1.2.3".parse().expect("ip")));
    }
}
