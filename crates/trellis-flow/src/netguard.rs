//! Outbound requests only reach the public internet, unless an allow-list says otherwise.
//!
//! A workflow author controls webhook URLs, so a URL is a way into the server's own network
//! (server-side request forgery). Every request goes through [`check`]: the URL is parsed the way
//! browsers parse it (so `2130706433`, `0x7f.1` and `0177.0.0.1` are all 127.0.0.1), the host is
//! resolved, and every address it resolves to must be public; IPv4 addresses embedded in IPv6
//! (mapped, compatible, NAT64, 6to4) are judged as the IPv4 address. The request is then sent to
//! the checked address itself (no second lookup for a rebinding DNS server to answer), and
//! redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Addresses that may be reached although they are not public (`127.0.0.1`, `10.0.0.0/8`,
/// `erp.internal`).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    nets: Vec<(IpAddr, u8)>,
    hosts: Vec<String>,
}

impl AllowList {
    /// Parse a comma-separated list of addresses, networks (CIDR) and host names.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = AllowList::default();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            if let Some((ip, bits)) = item.split_once('/') {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("`{item}` is not a network"))?;
                let bits: u8 = bits
                    .parse()
                    .map_err(|_| format!("`{item}` is not a network"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                if bits > max {
                    return Err(format!("`{item}` is not a network"));
                }
                out.nets.push((ip, bits));
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                out.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else {
                out.hosts.push(item.to_ascii_lowercase());
            }
        }
        Ok(out)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|(net, bits)| in_net(ip, *net, *bits))
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V4(_)) => {
            embedded_v4(a).is_some_and(|v4| in_net(v4.into(), net, bits))
        }
        _ => false,
    }
}

fn v4_blocked(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
}

/// The IPv4 address inside an IPv6 one (mapped, compatible, NAT64, 6to4), if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// Whether an address is off limits (not public).
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_blocked(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                // `::` and `::1` are themselves compatible-form addresses.
                return v6.is_unspecified() || v6.is_loopback() || v4_blocked(v4);
            }
            let s = v6.segments();
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
        }
    }
}

/// A URL that passed the check, with the address to connect to.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The parsed URL.
    pub url: reqwest::Url,
    /// Host name as written (for the `Host` header and TLS).
    pub host: String,
    /// The address the request must go to.
    pub addr: SocketAddr,
}

/// Parse and resolve `url`; refuse it unless every address it resolves to is public or allowed.
pub async fn check(url: &str, allow: &AllowList) -> Result<Checked, String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https URLs are allowed, not `{}`",
            parsed.scheme()
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("URLs with credentials are not allowed".into());
    }
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| "the URL has no port".to_owned())?;
    let (host, addrs): (String, Vec<IpAddr>) = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => (ip.to_string(), vec![IpAddr::V4(ip)]),
        Some(url::Host::Ipv6(ip)) => (format!("[{ip}]"), vec![IpAddr::V6(ip)]),
        Some(url::Host::Domain(d)) => {
            let d = d.to_ascii_lowercase();
            let found: Vec<IpAddr> = tokio::net::lookup_host((d.as_str(), port))
                .await
                .map_err(|e| format!("`{d}` does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect();
            if found.is_empty() {
                return Err(format!("`{d}` does not resolve"));
            }
            (d, found)
        }
        None => return Err(format!("`{url}` has no host")),
    };
    let host_allowed = allow.hosts.contains(&host);
    for ip in &addrs {
        if is_blocked(*ip) && !host_allowed && !allow.allows_ip(*ip) {
            return Err(format!(
                "`{host}` is (or resolves to) {ip}, a private, loopback or otherwise internal address; requests there are refused unless TRELLIS_OUTBOUND_ALLOW names it"
            ));
        }
    }
    Ok(Checked {
        addr: SocketAddr::new(addrs[0], port),
        host,
        url: parsed,
    })
}

/// A client that sends to the checked address only and follows no redirect.
pub fn client(c: &Checked, timeout: std::time::Duration) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .no_proxy();
    if let Some(url::Host::Domain(d)) = c.url.host() {
        b = b.resolve(d, c.addr);
    }
    b.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(check(url, &AllowList::default())).is_err()
    }

    #[test]
    fn internal_addresses_in_every_spelling_are_refused() {
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://0x7f.0.0.1/",
            "http://0/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:a00:1::]/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[fc00::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://localhost/",
            "http://LOCALHOST./",
            "ftp://example.com/",
            "file:///etc/passwd",
            "http://user:pw@example.com/",
        ] {
            assert!(refused(url), "{url} must be refused");
        }
    }

    #[test]
    fn public_addresses_pass_the_check() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "172.32.0.1",
            "100.128.0.1",
        ] {
            assert!(!is_blocked(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_allow_list_opens_named_addresses_only() {
        let allow = AllowList::parse("127.0.0.1, 10.0.0.0/8").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(rt.block_on(check("http://127.0.0.1:9/x", &allow)).is_ok());
        assert!(rt.block_on(check("http://10.9.9.9/", &allow)).is_ok());
        assert!(rt.block_on(check("http://127.0.0.2/", &allow)).is_err());
        assert!(rt.block_on(check("http://192.168.0.1/", &allow)).is_err());
        // Mapped IPv6 of an allowed address is the same address.
        assert!(rt
            .block_on(check("http://[::ffff:127.0.0.1]/", &allow))
            .is_ok());
        assert!(AllowList::parse("10.0.0.0/40").is_err());
    }
}
