//! `gluster://HOST[:PORT][,HOST2[:PORT]...]/VOLUME/PATH[?size=SIZE]`, the
//! form QEMU users know (QEMU itself takes one server in the URL and more
//! in its JSON syntax; the comma list is ours).

use std::fmt;

/// glusterd's management port, where volfiles are fetched.
pub const DEFAULT_PORT: u16 = 24007;

/// A volfile server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Server {
    /// Name or address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A parsed Gluster image location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlusterUrl {
    pub servers: Vec<Server>,
    pub volume: String,
    /// Path of the image inside the volume, starting with '/'.
    pub path: String,
    /// The `size` query parameter, unparsed: the caller owns size syntax.
    pub size: Option<String>,
}

impl fmt::Display for GlusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gluster://")?;
        for (i, s) in self.servers.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{s}")?;
        }
        write!(f, "/{}{}", self.volume, self.path)?;
        if let Some(s) = &self.size {
            write!(f, "?size={s}")?;
        }
        Ok(())
    }
}

fn server(s: &str) -> Result<Server, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("server {s:?}: missing ']' after an IPv6 address"))?;
        match after {
            "" => (h, None),
            p if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return Err(format!("server {s:?}: expected ':PORT' after ']'")),
        }
    } else if s.matches(':').count() > 1 {
        return Err(format!(
            "server {s:?}: write IPv6 addresses in brackets, as [::1]:24007"
        ));
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("server {s:?}: empty host"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '?')
    {
        return Err(format!("server {s:?}: not a host name or address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "server {s:?}: port {p:?} is not a number in 1..65535"
                ))
            }
        },
    };
    Ok(Server {
        host: host.to_string(),
        port,
    })
}

impl GlusterUrl {
    /// Parse; the error says which part is wrong.
    pub fn parse(s: &str) -> Result<GlusterUrl, String> {
        let rest = s
            .strip_prefix("gluster://")
            .or_else(|| s.strip_prefix("gluster+tcp://"))
            .ok_or_else(|| {
                format!("{s:?} does not start with gluster:// (form: gluster://HOST[:PORT][,HOST2[:PORT]...]/VOLUME/PATH[?size=SIZE])")
            })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, vol_path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: missing /VOLUME/PATH after the servers"))?;
        if hosts.is_empty() {
            return Err(format!("{s:?}: no server before /VOLUME/PATH"));
        }
        let servers = hosts
            .split(',')
            .map(server)
            .collect::<Result<Vec<_>, _>>()?;
        let (volume, path) = vol_path
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: missing /PATH after the volume name"))?;
        if volume.is_empty()
            || !volume
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(format!(
                "{s:?}: volume name {volume:?} must be letters, digits, '-', '_' or '.'"
            ));
        }
        let path = format!("/{path}");
        if path.ends_with('/') || path.split('/').any(|c| c == "." || c == "..") {
            return Err(format!(
                "{s:?}: image path {path:?} must name a file (no trailing '/', '.' or '..')"
            ));
        }
        if path.contains('\0') {
            return Err(format!("{s:?}: image path contains NUL"));
        }
        let mut size = None;
        if let Some(q) = query {
            for kv in q.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("size", v)) if !v.is_empty() => size = Some(v.to_string()),
                    Some(("size", _)) => return Err(format!("{s:?}: size= needs a value")),
                    _ => {
                        return Err(format!(
                            "{s:?}: unknown query parameter {kv:?} (only size=SIZE is known)"
                        ))
                    }
                }
            }
        }
        Ok(GlusterUrl {
            servers,
            volume: volume.to_string(),
            path,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let u = GlusterUrl::parse("gluster://127.0.0.2/gv0/disk0.img").unwrap();
        assert_eq!(
            u.servers,
            vec![Server {
                host: "127.0.0.2".into(),
                port: 24007
            }]
        );
        assert_eq!((u.volume.as_str(), u.path.as_str()), ("gv0", "/disk0.img"));
        assert_eq!(u.size, None);
        let u = GlusterUrl::parse(
            "gluster://a.example:24008,[fe80::1]:24009,[::1],b/vol_1/dir/sub/x.img?size=10GiB",
        )
        .unwrap();
        let hs: Vec<String> = u.servers.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            hs,
            [
                "a.example:24008",
                "[fe80::1]:24009",
                "[::1]:24007",
                "b:24007"
            ]
        );
        assert_eq!(u.path, "/dir/sub/x.img");
        assert_eq!(u.size.as_deref(), Some("10GiB"));
        assert_eq!(
            u.to_string(),
            "gluster://a.example:24008,[fe80::1]:24009,[::1]:24007,b:24007/vol_1/dir/sub/x.img?size=10GiB"
        );
        assert!(GlusterUrl::parse("gluster+tcp://h/v/p").is_ok());
    }

    #[test]
    fn errors_say_what() {
        for (s, want) in [
            ("file:/x", "does not start with gluster://"),
            ("gluster://h", "missing /VOLUME/PATH"),
            ("gluster:///v/p", "no server"),
            ("gluster://h/v", "missing /PATH"),
            ("gluster://h/v/", "must name a file"),
            ("gluster://h/v/a/../b", "must name a file"),
            ("gluster://h//p", "volume name"),
            ("gluster://h/v%x/p", "volume name"),
            ("gluster://h:0/v/p", "port"),
            ("gluster://h:99999/v/p", "port"),
            ("gluster://h:x/v/p", "port"),
            ("gluster://::1/v/p", "brackets"),
            ("gluster://[::1/v/p", "missing ']'"),
            ("gluster://h,,g/v/p", "empty host"),
            ("gluster://h/v/p?size=", "needs a value"),
            ("gluster://h/v/p?sise=1G", "unknown query parameter"),
        ] {
            let e = GlusterUrl::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
