//! The one decision on an origin URL. Ruby asks it before the client
//! socket is taken (`Native.check_url`), and the exchange asks it again, so
//! a URL is judged by the parser the request will actually use
//! (`http::Uri`, as both origin clients parse it) plus the checks that
//! parser leaves out: a port that fits in 16 bits (`http::Uri` keeps
//! `:74326` and reports no port, which would mean port 80), a host a
//! resolver can look up, no user info, ASCII only. The URL that passes is
//! rewritten in a canonical form: `http://host:1234?x=1` becomes
//! `http://host:1234/?x=1` (else `GET ?x=1` would go on the wire), a
//! fragment is dropped.
//!
//! The URL is parsed here once, into a [`Target`] that carries what every
//! later step needs (the host to resolve, the port, the pool and limits
//! keys, the request path, the parsed `http::Uri` for hyper), so nothing
//! downstream parses it again or compares it by prefix.

use std::net::Ipv6Addr;

/// An origin URL that passed, parsed once, as the origin clients, the
/// limits and the metrics use it.
///
/// It holds the parsed canonical URL and nothing derivable from it: the
/// host, port, address, keys, Host header and path are read off the
/// `http::Uri` on use. An open stream keeps its target for hours, so each
/// derived string stored here was heap (and exchange-future size) paid per
/// stream; deriving them costs a small allocation where one is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The canonical URL (scheme, authority without user info, a path that
    /// starts with `/`, the query; no fragment) as `http::Uri`: the one
    /// copy of its text, which hyper takes as is.
    uri: http::Uri,
    /// The scheme `check` decided on (no heap): it says which default port
    /// applies and how the URL is written back (`tcp://` has no path).
    scheme: Scheme,
}

/// The scheme of a [`Target`], lowercased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    /// `proxy_tunnel`'s raw TCP target.
    Tcp,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tcp => "tcp",
        }
    }

    /// The port a URL without one means (a `tcp://` URL always names its
    /// own: `check` refuses one without).
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
            Scheme::Tcp => 0,
        }
    }
}

impl Target {
    /// The scheme, lowercased.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The canonical URL as `http::Uri`, for hyper.
    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }

    /// The canonical URL: what errors, summaries and callbacks name.
    pub fn url(&self) -> String {
        self.to_string()
    }

    /// The authority as the URL writes it: host (an IPv6 literal in
    /// brackets) and the port when the URL names one.
    fn authority(&self) -> &str {
        self.uri.authority().map_or("", |a| a.as_str())
    }

    /// The host as the URL writes it (an IPv6 literal in brackets).
    pub fn host_in_url(&self) -> &str {
        self.uri.host().unwrap_or("")
    }

    /// The host the connection goes to (brackets of an IPv6 literal
    /// removed): what `allowed_hosts` must be matched against, and what a
    /// resolver takes.
    pub fn host(&self) -> &str {
        let host = self.host_in_url();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// The port, the scheme's default filled in.
    pub fn port(&self) -> u16 {
        self.uri.port_u16().unwrap_or(self.scheme.default_port())
    }

    /// `host:port` with the default port filled in (brackets kept), for a
    /// socket connect; also the HTTP/1.1 pool's key.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host_in_url(), self.port())
    }

    /// `scheme://host:port` (brackets kept, the default port filled in):
    /// the key of the per-origin limit.
    pub fn origin_key(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.address())
    }

    /// The Host header the gem's own client sends: the host as written,
    /// with the port only when the URL names one other than the default.
    pub fn host_header(&self) -> &str {
        match self.uri.port_u16() {
            Some(port) if port != self.scheme.default_port() => self.authority(),
            _ => self.host_in_url(),
        }
    }

    /// The request target on the wire: `/` at least, the query kept.
    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }
}

impl std::fmt::Display for Target {
    /// The canonical URL (a `tcp://` target has no path).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = self.scheme.as_str();
        match self.scheme {
            Scheme::Tcp => write!(f, "{scheme}://{}", self.authority()),
            _ => write!(f, "{scheme}://{}{}", self.authority(), self.path_and_query()),
        }
    }
}

/// Which URLs a caller takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `http://` or `https://` (proxy_fetch, proxy_async).
    Http,
    /// `tcp://host:port` and nothing else (proxy_tunnel's target).
    Tcp,
}

/// Checks `url`; the error is a sentence for an ArgumentError.
pub fn check(url: &str, kind: Kind) -> Result<Target, String> {
    let wanted = match kind {
        Kind::Http => "url must be http:// or https://",
        Kind::Tcp => "proxy_tunnel target must look like tcp://host:port",
    };
    // The scheme first: `file:///etc/passwd` does not even parse, and the
    // scheme is what the caller got wrong.
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s)
        .filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
        .map(str::to_ascii_lowercase);
    let scheme_ok = matches!(
        (kind, scheme.as_deref()),
        (Kind::Http, Some("http" | "https")) | (Kind::Tcp, Some("tcp"))
    );
    if !scheme_ok {
        return Err(format!("{wanted}, got {url:?}"));
    }
    if !url.is_ascii() {
        return Err(format!(
            "malformed url {url:?}: not ASCII (percent-encode the path and query, punycode the host)"
        ));
    }
    let input = url;
    let uri: http::Uri = url.parse().map_err(|e| format!("malformed url {url:?}: {e}"))?;
    let scheme = scheme.unwrap_or_default();
    let authority = match uri.authority() {
        Some(authority) if !authority.host().is_empty() => authority,
        _ => return Err(format!("url has no host: {url:?}")),
    };
    if authority.as_str().contains('@') {
        return Err(format!("url must not carry user info: {:?}", authority.host()));
    }
    check_host(authority.host()).map_err(|why| format!("url has an invalid host ({why}): {url:?}"))?;
    // `http::Uri` reads the port as the text after the host's last ':';
    // it must be 1-65535 in plain digits ("" means the default).
    let port_text = &authority.as_str()[authority.host().len()..];
    let port_text = port_text.strip_prefix(':').unwrap_or(port_text);
    let port = match port_text {
        "" => None,
        digits => match digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse::<u16>().ok())
        {
            Some(Some(port)) if port > 0 => Some(port),
            _ => {
                return Err(format!(
                    "url has an invalid port {digits:?} (1 to 65535): {url:?}"
                ))
            }
        },
    };
    let scheme = match scheme.as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        _ if port.is_some() => Scheme::Tcp,
        _ => return Err(format!("{wanted}, got {url:?} (no port)")),
    };
    let host_text = authority.host();
    let authority = match port {
        Some(port) => format!("{host_text}:{port}"),
        None => host_text.to_owned(),
    };
    let path_and_query = uri.path_and_query().map_or("", |p| p.as_str());
    let url = match kind {
        Kind::Tcp => {
            if !matches!(path_and_query, "" | "/")
                || url.contains('#')
                || url.ends_with('/')
                || url.ends_with('?')
            {
                return Err(format!("{wanted}, got {url:?} (no path, query or fragment)"));
            }
            format!("tcp://{authority}")
        }
        Kind::Http if path_and_query.starts_with('/') => {
            format!("{}://{authority}{path_and_query}", scheme.as_str())
        }
        Kind::Http => format!("{}://{authority}/{path_and_query}", scheme.as_str()),
    };
    // Parsed again only when normalising changed it (it still parses: it
    // is the input, normalised).
    let uri = if url == input {
        uri
    } else {
        url.parse().map_err(|e| format!("malformed url {url:?}: {e}"))?
    };
    Ok(Target { uri, scheme })
}

/// The host as a resolver or a socket takes it: an IPv6 literal in
/// brackets, else a name or IPv4 address of letters, digits, '-', '_' and
/// dots, in labels of 1 to 63 bytes (a trailing dot is fine).
fn check_host(host: &str) -> Result<(), &'static str> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("unclosed bracket")?;
        inner.parse::<Ipv6Addr>().map_err(|_| "not an IPv6 address")?;
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err("longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("an empty or too long label");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-', '_' and '.'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Target {
        check(url, Kind::Http).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str, kind: Kind) -> String {
        match check(url, kind) {
            Ok(checked) => panic!("{url} passed as {checked:?}"),
            Err(message) => message,
        }
    }

    #[test]
    fn a_url_without_a_path_gets_slash() {
        assert_eq!(ok("http://h:1234?x=1").url(), "http://h:1234/?x=1");
        assert_eq!(ok("http://h").url(), "http://h/");
        assert_eq!(
            ok("HTTPS://Files.Internal/a?b#frag").url(),
            "https://Files.Internal/a?b"
        );
        assert_eq!(ok("http://h:/p").url(), "http://h/p");
        assert_eq!(ok("http://h:0080/p").url(), "http://h:80/p");
    }

    #[test]
    fn hosts_and_addresses() {
        let checked = ok("http://[::1]:8080");
        assert_eq!(
            (checked.host(), checked.address()),
            ("::1", "[::1]:8080".to_owned())
        );
        assert_eq!(ok("https://a_b.example.").address(), "a_b.example.:443");
        assert_eq!(ok("http://127.0.0.1/").address(), "127.0.0.1:80");
    }

    #[test]
    fn targets_carry_the_keys_host_header_and_path() {
        let t = ok("http://example.com/a?b=1");
        assert_eq!(
            (t.address(), t.host_header(), t.path_and_query(), t.origin_key()),
            (
                "example.com:80".to_owned(),
                "example.com",
                "/a?b=1",
                "http://example.com:80".to_owned()
            )
        );
        let t = ok("http://[::1]:8080");
        assert_eq!(
            (t.host(), t.port(), t.host_header(), t.path_and_query()),
            ("::1", 8080, "[::1]:8080", "/")
        );
        assert_eq!(t.host_in_url(), "[::1]");
        assert_eq!(ok("http://h:80/").host_header(), "h");
        assert_eq!(ok("https://h:8443/").host_header(), "h:8443");
        assert_eq!(ok("https://a.test/").origin_key(), "https://a.test:443");
        assert_eq!(
            ok("http://127.0.0.1:9000/p").origin_key(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(ok("HTTPS://A.test?q").uri(), "https://A.test/?q");
        assert_eq!(
            check("tcp://db:5432", Kind::Tcp).unwrap().origin_key(),
            "tcp://db:5432"
        );
    }

    #[test]
    fn out_of_range_and_odd_ports_are_refused() {
        for url in [
            "http://h:74326/",
            "http://h:65536/",
            "http://h:0/",
            "http://h:+80/",
            "http://h:99999999999999999999/",
        ] {
            assert!(refused(url, Kind::Http).contains("invalid port"), "{url}");
        }
    }

    #[test]
    fn what_http_uri_refuses_or_would_misread() {
        assert!(refused("http://h/a?a=1 2", Kind::Http).contains("malformed url"));
        assert!(refused("http://127%2e0%2e0%2e1:80/", Kind::Http).contains("malformed url"));
        assert!(refused("http://exa mple.com/", Kind::Http).contains("malformed url"));
        assert!(refused("http://h/ü", Kind::Http).contains("not ASCII"));
        assert!(refused("http://u:p@h/", Kind::Http).contains("user info"));
        assert!(refused("http://:80/", Kind::Http).contains("no host"));
        assert!(refused("http://a..b/", Kind::Http).contains("invalid host"));
        assert!(refused("http://a!b/", Kind::Http).contains("invalid host"));
        assert!(refused("http://[v1.x]/", Kind::Http).contains("invalid host"));
        for url in [
            "ftp://h/",
            "file:///etc/passwd",
            "/relative",
            "h/p",
            "",
            "tcp://h:1",
        ] {
            assert!(refused(url, Kind::Http).contains("http:// or https://"), "{url}");
        }
    }

    #[test]
    fn tunnel_targets() {
        let checked = check("tcp://[::1]:5432", Kind::Tcp).unwrap();
        assert_eq!(
            (checked.url(), checked.address(), checked.host()),
            ("tcp://[::1]:5432".to_owned(), "[::1]:5432".to_owned(), "::1")
        );
        assert_eq!(
            check("TCP://db.internal:5432", Kind::Tcp).unwrap().address(),
            "db.internal:5432"
        );
        for target in [
            "tcp://h",
            "tcp://h:5432/",
            "tcp://h:5432/x",
            "tcp://h:5432?x",
            "http://h:80",
            "tcp://h:74326",
        ] {
            assert!(check(target, Kind::Tcp).is_err(), "{target}");
        }
    }
}
